// The theme chosen with the studio's toggle (kept in localStorage by the app), set on <html>
// before the first paint so a dark choice never flashes light. Without a choice the style sheet
// follows the system (prefers-color-scheme). A static file: the CSP allows no inline script.
(function () {
  try {
    var theme = window.localStorage.getItem("zimage.theme");
    if (theme === "light" || theme === "dark") document.documentElement.setAttribute("data-theme", theme);
  } catch (e) {
    // storage refused (privacy settings, sandboxed frame): follow the system
  }
})();
