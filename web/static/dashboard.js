// cjs dashboard: live updates by short polling (the page's own URL with ?partial=1, swapped in
// place), POST actions with the session's CSRF token, and the batch page's plotly.js charts.
// No build step, no framework; every script and style comes from this server.
"use strict";

(function () {
  const body = document.body;
  const refreshMs = 1000 * parseFloat(body.dataset.refreshS || "3");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const flash = document.getElementById("flash");
  let busy = false;

  function say(text, kind) {
    flash.textContent = text;
    flash.className = kind || "";
    if (text) {
      window.clearTimeout(say.timer);
      say.timer = window.setTimeout(() => say(""), 8000);
    }
  }

  function partialUrl() {
    const url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    return url.toString();
  }

  // Replace every [data-live] region of the page by the one of the same name in `html`; a
  // response without regions replaces the whole content.
  function swap(html) {
    const holder = document.createElement("template");
    holder.innerHTML = html;
    const regions = holder.content.querySelectorAll("[data-live]");
    if (regions.length === 0) {
      document.getElementById("content").innerHTML = html;
      return;
    }
    regions.forEach((fresh) => {
      const old = document.querySelector(`[data-live="${fresh.dataset.live}"]`);
      if (old) old.replaceWith(fresh);
    });
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const reply = await fetch(partialUrl(), { headers: { Accept: "text/html" } });
      if (reply.ok) {
        swap(await reply.text());
        document.getElementById("updated").textContent = new Date().toLocaleTimeString();
      }
      await refreshCharts();
    } catch (err) {
      document.getElementById("updated").textContent = "offline";
    } finally {
      busy = false;
    }
  }

  function live() {
    const box = document.getElementById("live");
    return box && box.checked && document.visibilityState === "visible";
  }

  window.setInterval(() => {
    const charts = document.querySelector("section.charts");
    if (charts && charts.dataset.terminal === "1") return; // a finished batch does not change
    if (live()) refresh();
  }, refreshMs);

  // --- actions ---------------------------------------------------------------------------------

  async function act(button) {
    const question = button.dataset.confirm;
    if (question && !window.confirm(question)) return;
    button.disabled = true;
    busy = true;
    try {
      const reply = await fetch(button.dataset.url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({
          stream: button.dataset.stream,
          entry_id: button.dataset.entry,
          action: button.dataset.action,
          min_idle_s: button.dataset.minIdle || "0",
          partition: button.dataset.partition || "",
        }),
      });
      const answer = await reply.json();
      if (reply.ok) {
        const to = answer.new_entry_id ? ` → ${answer.source_stream} ${answer.new_entry_id}` : "";
        const handed = answer.handed_to ? ` (handed to the live workers)` : "";
        const applied = answer.applied ? ` (applied in place: ${answer.applied})` : "";
        say(`${answer.action || button.dataset.action}: ${answer.entry_id}${to}${handed}${applied}`, "ok");
        if (button.dataset.after) {
          window.location.assign(button.dataset.after);
          return;
        }
      } else {
        say(`refused (${reply.status}): ${answer.error}`, "error");
      }
    } catch (err) {
      say(`failed: ${err}`, "error");
    } finally {
      busy = false;
      button.disabled = false;
    }
    refresh();
    // A reclaimed entry leaves once a live worker has taken it: look again shortly.
    window.setTimeout(refresh, 1200);
  }

  async function showText(button) {
    const row = button.closest("tr");
    const next = row.nextElementSibling;
    if (next && next.classList.contains("essay-text")) {
      next.remove();
      button.textContent = "show text";
      return;
    }
    const reply = await fetch(button.dataset.url);
    const text = await reply.text();
    const shown = document.createElement("tr");
    shown.className = "essay-text";
    const cell = document.createElement("td");
    cell.colSpan = row.children.length;
    const pre = document.createElement("pre");
    pre.textContent = reply.ok ? text : `not shown: ${text}`;
    cell.appendChild(pre);
    shown.appendChild(cell);
    row.after(shown);
    button.textContent = "hide text";
    document.getElementById("live").checked = false; // a refresh would hide it again
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.classList.contains("act")) act(button);
    else if (button.classList.contains("show-text")) showText(button);
  });

  // --- charts (batch page) -----------------------------------------------------------------------

  let config = {};

  function draw(figures, first) {
    document.querySelectorAll("[data-figure]").forEach((div) => {
      const figure = figures[div.dataset.figure];
      if (!figure) return;
      if (first) window.Plotly.newPlot(div, figure.data, figure.layout, config);
      else window.Plotly.react(div, figure.data, figure.layout, config);
    });
  }

  async function refreshCharts() {
    const section = document.querySelector("section.charts");
    if (!section || !window.Plotly) return;
    const reply = await fetch(section.dataset.figuresUrl);
    if (!reply.ok) return;
    const answer = await reply.json();
    draw(answer.figures, false);
    if (answer.status && ["finalized", "failed"].includes(answer.status.status)) {
      section.dataset.terminal = "1";
    }
  }

  window.addEventListener("DOMContentLoaded", () => {
    const data = document.getElementById("figures");
    if (data && window.Plotly) {
      const parsed = JSON.parse(data.textContent);
      config = parsed.config;
      draw(parsed.figures, true);
    }
  });
})();
