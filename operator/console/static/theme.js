// Runs before the page paints: the saved theme (else the system's prefers-color-scheme).
(function () {
  var saved = localStorage.getItem("kubetune-theme");
  if (saved) document.documentElement.dataset.theme = saved;
})();
