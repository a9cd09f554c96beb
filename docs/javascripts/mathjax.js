// MathJax 3 configuration for pymdownx.arithmatex (generic mode): arithmatex wraps $...$ as \(...\)
// and $$...$$ as \[...\] inside elements of class "arithmatex"; only those are typeset.
// The renderer is the bundled vendor/mathjax/tex-svg-full.js (loaded after this file, see mkdocs.yml):
// SVG output, so no web fonts are fetched and the math renders offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  svg: {
    fontCache: "global",
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// mkdocs-material's instant navigation swaps pages without a reload: typeset each new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.startup && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
