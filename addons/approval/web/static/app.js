// The reviewers' page: live updates over server-sent events, relative times.
// No framework; no HTML is built from data here: new content is the server's own
// (escaped) page, parsed with DOMParser, which runs no scripts.
"use strict";

function busy() {
  // a reviewer typing a reason must not lose it to a refresh
  for (const t of document.querySelectorAll("#live textarea")) {
    if (t.value.trim() !== "" || t === document.activeElement) return true;
  }
  return false;
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  if (busy()) {
    document.getElementById("stale").hidden = false;
    return;
  }
  refreshing = true;
  try {
    const r = await fetch(location.pathname, {credentials: "same-origin",
                                              headers: {"Accept": "text/html"}});
    if (!r.ok || r.redirected) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    const fresh = doc.getElementById("live");
    const live = document.getElementById("live");
    if (fresh && live && !busy()) {
      live.replaceChildren(...Array.from(fresh.childNodes).map((n) => document.adoptNode(n)));
      tick();
    }
  } finally {
    refreshing = false;
  }
}

function human(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  if (seconds < 120) return seconds + "s";
  if (seconds < 7200) return Math.floor(seconds / 60) + "m " + (seconds % 60) + "s";
  return Math.floor(seconds / 3600) + "h " + Math.floor((seconds % 3600) / 60) + "m";
}

function tick() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = human(now - Number(el.dataset.since));
  }
  for (const el of document.querySelectorAll("[data-until]")) {
    el.textContent = "in " + human(Number(el.dataset.until) - now);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (!live || live.dataset.live !== "yes") return;
  setInterval(tick, 1000);
  const path = location.pathname;
  if (path === "/ui/" || path === "/ui" || path === "/ui/history" ||
      path.startsWith("/ui/approvals/")) {
    const es = new EventSource("/ui/events");
    es.addEventListener("change", refresh);
    es.addEventListener("open", refresh);  // after a reconnect: catch up
    es.addEventListener("login", () => es.close());
  }
});
