// The console's own behaviour, loaded as a static file because the Content-Security-Policy allows no
// inline script: the narrow-window menu toggle, and a confirmation before a destructive form posts
// (<form data-confirm="...">; htmx forms use hx-confirm instead).
(function () {
  document.documentElement.classList.add("js");

  function ready() {
    const toggle = document.querySelector(".nav-toggle");
    const list = document.getElementById("menu-list");
    if (toggle && list) {
      toggle.addEventListener("click", function () {
        const open = toggle.getAttribute("aria-expanded") !== "true";
        toggle.setAttribute("aria-expanded", open ? "true" : "false");
        list.classList.toggle("open", open);
      });
    }
  }

  document.addEventListener("submit", function (event) {
    const form = event.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready);
  else ready();
})();
