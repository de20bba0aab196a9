// Registers the service worker (static file, so no inline script is needed). Skipped inside frames:
// the embed page is a guest on someone else's site.
(function () {
  if (!("serviceWorker" in navigator) || window.top !== window) return;
  window.addEventListener("load", function () {
    navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch(function (e) {
      console.warn("service worker not registered:", e && e.message);
    });
  });
})();
