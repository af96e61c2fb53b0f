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
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function line(parts) {
    const div = el("div");
    for (const p of parts) div.appendChild(typeof p === "string" ? document.createTextNode(p) : p);
    div.title = div.textContent;
    return div;
  }

  // What a grader weighs besides the picture: an edge-padded stamp, masked pixels, detections
  // merged from overlapping tiles, catalogue flags. "clean" when none applies.
  function flags(c) {
    const out = [];
    if (c.edge) out.push(el("span", "flag flag-edge", "edge"));
    if (c.masked_fraction) out.push(el("span", "flag flag-masked", "masked " + Math.round(100 * c.masked_fraction) + "%"));
    if (c.n_detections > 1) out.push(el("span", "flag flag-det", c.n_detections + " det"));
    if (c.flags) out.push(el("span", "flag flag-cat", "flags " + c.flags));
    if (!out.length) out.push(el("span", "flag flag-ok", "clean"));
    // A known lens (lenscat or the run's catalogue): graded against what is already published.
    if (c.known) out.push(el("span", "flag flag-known", "known: " + c.known + (c.known_grading ? " (" + c.known_grading + ")" : "")));
    const div = line(out);
    div.className = "flags";
    return div;
  }

  function card(c, i) {
    const div = el("div", "card");
    div.dataset.rank = c.rank;
    div.dataset.id = c.id;
    div.dataset.pos = i;
    const pics = el("div", "pics");
    const colour = el("img", "colour");
    colour.src = c.colour;
    colour.alt = "candidate " + c.rank + " (" + INDEX.rgb.join("") + ")";
    pics.appendChild(colour);
    pics.appendChild(el("div", "grade"));
    const bands = el("img", "bands");
    bands.src = c.bands;
    bands.alt = "bands " + INDEX.bands.join(", ");
    pics.appendChild(bands);
    const names = el("div", "bandnames");
    for (const b of INDEX.bands) names.appendChild(el("span", "", b));
    pics.appendChild(names);
    div.appendChild(pics);
    const info = el("div", "info");
    info.appendChild(line(["#" + c.rank + " \u00b7 ", el("span", "score", c.score_text || fmt(c.score, 4))]));
    info.appendChild(line(["RA " + fmt(c.ra, 5) + " Dec " + fmt(c.dec, 5)]));
    const mags = Object.entries(c.mags).map(([b, m]) => b + " " + fmt(m, 2)).join("  ");
    info.appendChild(line([mags || "no magnitudes"]));
    info.appendChild(line([c.tile + " \u00b7 " + c.id]));
    info.appendChild(flags(c));
    div.appendChild(info);
    div.addEventListener("click", () => { state.pos = i; highlight(); });
    showGrade(div, c);
    return div;
  }
  function showGrade(div, c) {
    const g = grades[candKey(c)];
    const e = div.querySelector(".grade");
    e.className = "grade" + (g ? " grade-" + g.grade : "");
    e.textContent = g ? g.grade : "";
  }

  function render() {
    const grid = $("grid");
    grid.textContent = "";
    pages[state.page].forEach((c, i) => grid.appendChild(card(c, i)));
    highlight();
  }
  // The sticky header covers the top of the page: scrolling keeps cards clear of it.
  function padScroll() {
    document.documentElement.style.scrollPaddingTop = ($("header").offsetHeight + 6) + "px";
  }
  function highlight() {
    for (const e of document.querySelectorAll(".card.current")) e.classList.remove("current");
    const e = document.querySelector('.card[data-pos="' + state.pos + '"]');
    if (e) {
      e.classList.add("current");
      padScroll();
      e.scrollIntoView({ block: "nearest" });
    }
    if (!$("context").hidden) showContext();
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
  // The wider cutout opens over the page, centred, and follows the current card while open;
  // it is loaded only when asked for.
  function showContext() {
    const c = current();
    if (!c) return;
    $("context-img").src = c.context;
    $("context-caption").textContent = "#" + c.rank + " \u00b7 " + (c.score_text || fmt(c.score, 4)) +
      " \u00b7 " + INDEX.context_pix + " px around the " + INDEX.stamp_pix + " px stamp (dashed)";
    $("context").hidden = false;
  }
  function toggleContext() {
    if ($("context").hidden) showContext(); else $("context").hidden = true;
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
    else if (k === "Escape" && !$("context").hidden) $("context").hidden = true;
    else if (k === "]" || k === "PageDown") goto(state.page + 1, 0);
    else if (k === "[" || k === "PageUp") goto(state.page - 1, 0);
    else if (k === "E") exportCsv();
    else return;
    ev.preventDefault();
  });

  const root = document.documentElement.style;
  root.setProperty("--stamp", INDEX.stamp_pix * INDEX.scale + "px");
  root.setProperty("--bands", String(INDEX.bands.length));
  root.setProperty("--context", INDEX.context_pix * INDEX.scale + "px");
  const inner = (100 * INDEX.stamp_pix / INDEX.context_pix).toFixed(3) + "%";
  const box = document.querySelector("#context .stamp-box").style;
  box.width = box.height = inner;
  box.left = box.top = ((100 - parseFloat(inner)) / 2).toFixed(3) + "%";
  $("context").addEventListener("click", () => { $("context").hidden = true; });
  window.addEventListener("resize", padScroll);
  document.title = INDEX.title;
  $("title").textContent = INDEX.title;
  $("summary").textContent = INDEX.n + " candidates, " + INDEX.page_size + " a page; model " +
    INDEX.model + "; colour " + INDEX.rgb.join("") + " and each band below it, one asinh stretch " +
    "shared by a stamp's bands (Lupton et al. 2004); stamps " + INDEX.stamp_pix + " px shown " +
    INDEX.scale + "x; wider cutout " + INDEX.context_pix + " px (X).";
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
