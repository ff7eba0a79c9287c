// Client-side search over window.SEARCH_INDEX (one entry per section of every page): all words must match.
(function () {
  var q = (new URLSearchParams(location.search).get('q') || '').trim(), box = document.getElementById('results');
  document.querySelector('header input[name=q]').value = q;
  if (!q) return;
  var words = q.toLowerCase().split(/\s+/), esc = function (s) { var d = document.createElement('div'); d.textContent = s; return d.innerHTML; };
  var hits = window.SEARCH_INDEX.map(function (e) {
    var head = e.heading.toLowerCase(), text = e.text.toLowerCase(), score = 0;
    for (var i = 0; i < words.length; i++) {
      if (head.indexOf(words[i]) >= 0) score += 10; else if (text.indexOf(words[i]) >= 0) score += 1; else return null;
    }
    return {e: e, score: score};
  }).filter(Boolean).sort(function (a, b) { return b.score - a.score; }).slice(0, 50);
  box.innerHTML = '<p>' + hits.length + ' result(s) for <b>' + esc(q) + '</b></p>' + hits.map(function (h) {
    var t = h.e.text, i = t.toLowerCase().indexOf(words[0]), snip = t.slice(Math.max(0, i - 60), i + 140);
    return '<div class="hit"><a href="' + h.e.url + '">' + esc(h.e.heading) + '</a> <small>' + esc(h.e.title) +
           '</small><br>' + esc(snip) + '…</div>';
  }).join('');
})();
