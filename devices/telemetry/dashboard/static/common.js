// Shared helpers of the dashboard pages (no framework, no CDN).
"use strict";
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function ago(t, now) {
  if (t === null || t === undefined) return "never";
  const s = Math.max(0, now - t);
  if (s < 2) return "now";
  if (s < 120) return Math.round(s) + " s ago";
  if (s < 7200) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}
function clock(t) {
  return t === null || t === undefined ? "" : new Date(t * 1000).toLocaleTimeString();
}
function live(url, handlers, statusEl) {
  // EventSource reconnects by itself; the status line says when the stream is down.
  const src = new EventSource(url);
  src.onopen = () => { statusEl.textContent = "live"; };
  src.onerror = () => { statusEl.textContent = "reconnecting…"; };
  for (const [name, fn] of Object.entries(handlers)) {
    src.addEventListener(name, (e) => fn(JSON.parse(e.data)));
  }
  return src;
}
