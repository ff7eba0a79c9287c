// Typeset the page's math with the KaTeX served by this site (no CDN).
document.addEventListener('DOMContentLoaded', function () {
  renderMathInElement(document.getElementById('content'), {
    delimiters: [{left: '$$', right: '$$', display: true}, {left: '\\[', right: '\\]', display: true},
                 {left: '$', right: '$', display: false}, {left: '\\(', right: '\\)', display: false}],
    ignoredClasses: ['jp-OutputArea', 'highlight'], throwOnError: false });
  document.body.dataset.math = 'done';   // for tests: typesetting has run
});
