// knotd status page: live updates over /events (Server-Sent Events) and ticking clocks.
// The server renders every section (the page works without this script); a "page" event carries the
// sections again, and a section is replaced only when its hash changed, so screen readers announce the
// status region only when the status changes. EventSource reconnects by itself after a lost connection.
(function () {
  "use strict";

  var live = document.getElementById("live");
  var clockOffset = 0; // server clock minus browser clock, in seconds

  // The same format as knotd.status.page.format_duration.
  function duration(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function tick() {
    var now = Date.now() / 1000 + clockOffset;
    document.querySelectorAll("time[data-since]").forEach(function (el) {
      el.textContent = duration(now - Number(el.dataset.since));
    });
  }

  function showConnection(state, text) {
    live.hidden = false;
    live.dataset.state = state;
    live.textContent = text;
  }

  function applyPage(event) {
    var update = JSON.parse(event.data);
    clockOffset = update.server_time - Date.now() / 1000;
    document.title = update.title;
    Object.keys(update.sections).forEach(function (id) {
      var section = update.sections[id];
      var el = document.getElementById(id);
      if (el && el.dataset.hash !== section.hash) {
        el.innerHTML = section.html; // server-rendered with autoescaping, same as the first paint
        el.dataset.hash = section.hash;
      }
    });
    tick();
  }

  function connect() {
    var source = new EventSource("/events");
    source.addEventListener("page", applyPage);
    source.onopen = function () { showConnection("live", "live"); };
    source.onerror = function () {
      showConnection("down", "reconnecting…");
      // EventSource gives up for good on an HTTP error (e.g. 503 while shutting down); start over then.
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 5000);
    };
  }

  if (!window.EventSource || !live) return;
  showConnection("connecting", "connecting…");
  connect();
  setInterval(tick, 1000);
})();
