"use strict";
// lenscan inspection page: pages of candidates loaded on demand, keyboard grading kept in
// localStorage, CSV export. No network access and no libraries: works from file://.
(function () {
  const INDEX = window.LENSCAN_INDEX;
  const GRADES = ["A", "B", "C", "N"];
  const KEY = "lenscan:" + INDEX.catalogue;
  const pages = {};
  const undoStack = [];
  const state = { page: 1, pos: 0, loading: null };
  let grades = {};
  try {
    grades = JSON.parse(localStorage.getItem(KEY + ":grades") || "{}");
  } catch (err) {
    grades = {};
  }
  const $ = (id) => document.getElementById(id);

  function save() {
    localStorage.setItem(KEY + ":grades", JSON.stringify(grades));
    localStorage.setItem(KEY + ":position", JSON.stringify({ page: state.page, pos: state.pos }));
  }
  function candKey(c) { return c.tile + ":" + c.id; }
  function current() { const recs = pages[state.page]; return recs ? recs[state.pos] : null; }

  function status() {
    $("page-label").textContent = "page " + state.page + " of " + INDEX.n_pages;
    $("progress").textContent = Object.keys(grades).length + " of " + INDEX.n + " graded";
  }

  function loadPage(p, then) {
    if (pages[p]) { then(); return; }
    state.loading = then;
    const el = document.createElement("script");
    el.src = "pages/p" + String(p).padStart(5, "0") + ".js";
    el.onerror = () => { $("grid").textContent = "could not load " + el.src; };
    document.head.appendChild(el);
  }
  window.lenscanPage = function (p, records) {
    pages[p] = records;
    const then = state.loading;
    state.loading = null;
    if (then) then();
  };

  function fmt(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }

  function card(c, i) {
    const s = INDEX.stamp_pix * INDEX.scale;
    const div = document.createElement("div");
    div.className = "card";
    div.dataset.rank = c.rank;
    div.dataset.id = c.id;
    div.dataset.pos = i;
    const strip = document.createElement("img");
    strip.className = "strip";
    strip.src = c.strip;
    strip.alt = "candidate " + c.rank;
    strip.width = s * (1 + INDEX.bands.length);
    strip.height = s;
    const left = document.createElement("div");
    left.appendChild(strip);
    const labels = document.createElement("div");
    labels.className = "bands";
    for (const name of [INDEX.rgb.join("")].concat(INDEX.bands)) {
      const span = document.createElement("span");
      span.style.width = s + "px";
      span.textContent = name;
      labels.appendChild(span);
    }
    left.appendChild(labels);
    const ctx = document.createElement("img");
    ctx.className = "context";
    ctx.dataset.src = c.context;
    ctx.alt = "context of candidate " + c.rank;
    const cs = INDEX.context_pix * Math.max(2, Math.round(INDEX.scale / 2));
    ctx.width = cs;
    ctx.height = cs;
    left.appendChild(ctx);
    const info = document.createElement("div");
    info.className = "info";
    const mags = Object.entries(c.mags).map(([b, m]) => b + " " + fmt(m, 2)).join(", ");
    info.innerHTML =
      "<div>#" + c.rank + " &middot; score <b>" + fmt(c.score, 4) + "</b></div>" +
      "<div>id " + c.id + " &middot; tile " + escapeHtml(c.tile) + (c.edge ? " &middot; <b>edge</b>" : "") + "</div>" +
      "<div>RA " + fmt(c.ra, 5) + " Dec " + fmt(c.dec, 5) + "</div>" +
      "<div>mag " + escapeHtml(mags) + "</div>" +
      '<div class="grade"></div>';
    div.appendChild(left);
    div.appendChild(info);
    div.addEventListener("click", () => { state.pos = i; highlight(); });
    showGrade(div, c);
    return div;
  }
  function escapeHtml(s) {
    return String(s).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);
  }
  function showGrade(div, c) {
    const g = grades[candKey(c)];
    const el = div.querySelector(".grade");
    el.className = "grade" + (g ? " grade-" + g.grade : "");
    el.textContent = g ? g.grade : "";
  }

  function render() {
    const grid = $("grid");
    grid.textContent = "";
    pages[state.page].forEach((c, i) => grid.appendChild(card(c, i)));
    highlight();
  }
  function highlight() {
    for (const el of document.querySelectorAll(".card.current")) el.classList.remove("current");
    const el = document.querySelector('.card[data-pos="' + state.pos + '"]');
    if (el) {
      el.classList.add("current");
      el.scrollIntoView({ block: "nearest" });
    }
    status();
    save();
  }

  function goto(page, pos) {
    if (page < 1 || page > INDEX.n_pages) return;
    loadPage(page, () => {
      const n = pages[page].length;
      const samePage = page === state.page && document.querySelector(".card");
      state.page = page;
      state.pos = Math.max(0, Math.min(n - 1, pos < 0 ? n + pos : pos));
      if (samePage) highlight(); else render();
    });
  }
  function step(delta) {
    const n = pages[state.page].length;
    const pos = state.pos + delta;
    if (pos >= n) goto(state.page + 1, 0);
    else if (pos < 0) goto(state.page - 1, -1);
    else goto(state.page, pos);
  }

  function grade(letter) {
    const c = current();
    const grader = $("grader").value.trim();
    if (!c) return;
    if (!grader) {
      $("progress").textContent = "type your name in the grader box first";
      $("grader").focus();
      return;
    }
    const key = candKey(c);
    undoStack.push({ key: key, before: grades[key] || null, page: state.page, pos: state.pos });
    grades[key] = {
      id: c.id, tile: c.tile, ra: c.ra, dec: c.dec, rank: c.rank,
      grade: letter, grader: grader, time: new Date().toISOString(),
    };
    showGrade(document.querySelector('.card[data-pos="' + state.pos + '"]'), c);
    save();
    step(1);
  }
  function undo() {
    const last = undoStack.pop();
    if (!last) return;
    if (last.before) grades[last.key] = last.before; else delete grades[last.key];
    save();
    loadPage(last.page, () => {
      state.page = last.page;
      state.pos = last.pos;
      render();
    });
  }
  function toggleContext() {
    const el = document.querySelector(".card.current");
    if (!el) return;
    const img = el.querySelector("img.context");
    if (!img.getAttribute("src")) img.src = img.dataset.src;  // loaded only when asked for
    el.classList.toggle("show-context");
  }

  function csv() {
    const cols = ["id", "tile", "ra", "dec", "grade", "grader", "time"];
    const quote = (v) => { const s = String(v); return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; };
    const rows = Object.values(grades).sort((a, b) => a.rank - b.rank);
    return [cols.join(",")].concat(rows.map((g) => cols.map((k) => quote(g[k])).join(","))).join("\n") + "\n";
  }
  function exportCsv() {
    const grader = $("grader").value.trim() || "grader";
    const blob = new Blob([csv()], { type: "text/csv" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "grades-" + INDEX.catalogue + "-" + grader.replace(/[^A-Za-z0-9_.-]/g, "_") + ".csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.target instanceof HTMLInputElement || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key.length === 1 ? ev.key.toUpperCase() : ev.key;
    if (GRADES.includes(k)) grade(k);
    else if (k === "ArrowRight" || k === "J" || k === " ") step(1);
    else if (k === "ArrowLeft" || k === "K") step(-1);
    else if (k === "U" || k === "Backspace") undo();
    else if (k === "X") toggleContext();
    else if (k === "]" || k === "PageDown") goto(state.page + 1, 0);
    else if (k === "[" || k === "PageUp") goto(state.page - 1, 0);
    else if (k === "E") exportCsv();
    else return;
    ev.preventDefault();
  });

  document.title = INDEX.title;
  $("title").textContent = INDEX.title;
  $("summary").textContent = INDEX.n + " candidates, " + INDEX.page_size + " a page; model " +
    INDEX.model + "; colour = " + INDEX.rgb.join("") + " (Lupton asinh), then each band; stamps " +
    INDEX.stamp_pix + " px shown " + INDEX.scale + "x, context " + INDEX.context_pix + " px (X).";
  $("grader").value = localStorage.getItem("lenscan:grader") || "";
  $("grader").addEventListener("input", () => localStorage.setItem("lenscan:grader", $("grader").value.trim()));
  $("prev-page").addEventListener("click", () => goto(state.page - 1, 0));
  $("next-page").addEventListener("click", () => goto(state.page + 1, 0));
  $("export").addEventListener("click", exportCsv);
  window.lenscan = { csv: csv, state: state, grades: () => grades };
  let start = { page: 1, pos: 0 };
  try { start = JSON.parse(localStorage.getItem(KEY + ":position")) || start; } catch (err) { /* fresh start */ }
  if (INDEX.n === 0) { $("grid").textContent = "No candidates above the threshold."; status(); }
  else goto(Math.min(start.page, INDEX.n_pages), start.pos);
})();
