// Fleet page: one row per device, refreshed from /live/fleet (SSE).
"use strict";
const statusEl = document.getElementById("status");
const body = document.querySelector("#fleet tbody");

function render(devices) {
  const now = Date.now() / 1000;
  body.replaceChildren();
  let online = 0, alarms = 0;
  for (const d of devices) {
    online += d.online ? 1 : 0;
    alarms += d.alarms;
    const tr = el("tr", { "data-device": d.device, "data-online": String(d.online) });
    const name = el("td");
    name.appendChild(el("a", { href: "/device/" + encodeURIComponent(d.device) }, d.device));
    tr.appendChild(name);
    const state = el("td");
    state.appendChild(el("span", { class: "badge " + (d.online ? "online" : "offline") },
                         d.online ? "online" : "offline"));
    tr.appendChild(state);
    tr.appendChild(el("td", {}, d.alg || "?"));
    const bundle = d.bundle_id ? d.bundle_id + (d.bundle_version ? " @ " + d.bundle_version : "") : "";
    tr.appendChild(el("td", {}, bundle));
    tr.appendChild(el("td", {}, d.profile || ""));
    tr.appendChild(el("td", { title: clock(d.last_seen) }, ago(d.last_seen, now)));
    for (const key of ["received", "gaps", "dropped", "duplicates", "malformed"]) {
      tr.appendChild(el("td", { class: "num" }, d[key]));
    }
    tr.appendChild(el("td", { class: "num" + (d.alarms ? " alarm" : "") }, d.alarms));
    tr.appendChild(el("td", { class: "num" + (d.fallbacks ? " alarm" : "") }, d.fallbacks));
    body.appendChild(tr);
  }
  document.getElementById("summary").textContent =
    devices.length + " devices, " + online + " online, " + alarms + " OOD alarms";
}

fetch("/api/fleet").then((r) => r.json()).then((doc) => render(doc.devices));
live("/live/fleet", { fleet: (doc) => render(doc.devices) }, statusEl);
