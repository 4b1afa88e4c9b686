/* Live energy-flow page. No libraries: plain SVG, EventSource with a polling fallback.
   The server derives everything (states, arrow directions and widths); this file only draws. */
"use strict";

(() => {
  const NS = "http://www.w3.org/2000/svg";
  // Wide screens draw a 1280x420 diagram scaled to fit; narrower ones (phones, the Pi's 7" screen) stack the
  // units in one column drawn at 1 unit = 1 CSS px, so text keeps its size and the page scrolls instead.
  // The same breakpoint as style.css.
  const NARROW = window.matchMedia("(max-width: 999.98px)");
  let W = 1280;
  let H = 420;
  let narrow = false;
  const LANE = 56; // narrow: the line to the plant runs down this strip left of the cards
  const ICON_COL = 104; // narrow: sun and lamp to the right of the cards
  const ICON_GAP = 64; // narrow: from a card's edge to its icons' centre
  const LABEL_ROW = 48; // narrow: the trade label sits in this gap above each house
  const PALETTE = ["#56b4e9", "#e69f00", "#2bb38a", "#cc79a7", "#f0e442", "#e8743b", "#b0b8c0"];
  const DASHES = ["", "12 6", "3 5", "14 5 3 5", "7 4"];
  const POLL_MS = 5000;
  const SSE_RETRY_MS = 60000;
  const HISTORY_MS = 5 * 60 * 1000;
  const STATE_WORDS = {
    buying: "BUYING", selling: "SELLING", idle: "IDLE", charging: "CHARGING",
    "using battery": "USING BATTERY", generating: "CHARGING", full: "BATTERY FULL", "no sun": "NO SUN",
    unknown: "NO READING",
  };

  const $ = (id) => document.getElementById(id);

  function el(name, attrs, parent, text) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function pretty(name) {
    const text = String(name).replace(/[_-]+/g, " ").trim();
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  function unitColour(name, index) {
    const n = String(name).toLowerCase();
    if (n.includes("red")) return "#e8743b";
    if (n.includes("green")) return "#2bb38a";
    if (n.includes("blue")) return "#4ea3e6";
    if (n.includes("yellow")) return "#f0e442";
    if (n.includes("plant")) return "#d9d9d9";
    return PALETTE[index % PALETTE.length];
  }

  function fmtW(watts) {
    if (watts === null || watts === undefined) return "–";
    const a = Math.abs(watts);
    return (a < 10 ? a.toFixed(1) : a.toFixed(0)) + " W";
  }

  function fmtSignedW(watts) {
    if (watts === null || watts === undefined) return "";
    const sign = watts > 0.05 ? "+" : watts < -0.05 ? "−" : "";
    const a = Math.abs(watts);
    return sign + (a < 10 ? a.toFixed(2) : a.toFixed(1)) + " W";
  }

  function pad(n) { return String(n).padStart(2, "0"); }
  function clock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  // ---- layout ---------------------------------------------------------------------------------
  let built = null; // {key, boxes, cards, flows, plant}

  function measure() {
    narrow = NARROW.matches;
    if (narrow) {
      W = Math.max(300, Math.floor($("diagram").getBoundingClientRect().width));
    } else {
      W = 1280;
      H = 420;
    }
  }

  function stackedLayout(units) {
    // One column: the plant on top, the houses below it, each house's trade arrow off a line on the left.
    const boxes = {};
    const blockW = Math.min(W - 8, 560);
    const x0 = (W - blockW) / 2;
    const cw = blockW - LANE - ICON_COL;
    const ch = 178;
    const plant = units.find((u) => u.is_plant);
    let y = 6;
    if (plant) {
      boxes[plant.name] = { x: x0 + LANE, y, w: cw, h: ch, side: 1 };
      y += ch;
    }
    for (const h of units.filter((u) => !u.is_plant)) {
      y += LABEL_ROW;
      boxes[h.name] = { x: x0 + LANE, y, w: cw, h: ch, side: 1 };
      y += ch;
    }
    H = y + 6;
    boxes.lane = x0 + 12;
    return boxes;
  }

  function layout(units) {
    if (narrow) return stackedLayout(units);
    const boxes = {};
    const houses = units.filter((u) => !u.is_plant);
    const plant = units.find((u) => u.is_plant);
    if (plant) boxes[plant.name] = { x: W / 2 - 200, y: 10, w: 400, h: 130, side: -1 };
    const n = Math.max(houses.length, 1);
    const cw = Math.min(240, (W - 140 * (n + 1)) / n);
    const gap = (W - cw * n) / (n + 1);
    const ch = 178;
    houses.forEach((h, i) => {
      const x = gap + i * (cw + gap);
      const cx = x + cw / 2;
      boxes[h.name] = { x, y: H - ch - 6, w: cw, h: ch, side: cx > W / 2 + 1 ? 1 : -1 };
    });
    return boxes;
  }

  function houseIcon(g, x, y, colour) {
    el("path", { d: `M${x} ${y + 15} L${x + 19} ${y} L${x + 38} ${y + 15} V${y + 34} H${x} Z`, fill: colour }, g);
    el("rect", { x: x + 15, y: y + 20, width: 9, height: 14, fill: "#0f1822" }, g);
  }

  function plantIcon(g, x, y, colour) {
    el("path", { d: `M${x} ${y + 34} V${y + 16} L${x + 10} ${y + 22} V${y + 16} L${x + 20} ${y + 22} V${y + 2} H${x + 30} V${y + 34} Z`,
      fill: colour }, g);
    el("path", { d: `M${x + 27} ${y + 8} L${x + 19} ${y + 22} H${x + 25} L${x + 21} ${y + 33} L${x + 31} ${y + 18} H${x + 25} Z`,
      fill: "#e69f00" }, g);
  }

  function sunIcon(g, cx, cy) {
    el("circle", { class: "sun-disc", cx, cy, r: 15 }, g);
    for (let k = 0; k < 8; k += 1) {
      const a = (k * Math.PI) / 4;
      el("line", { class: "sun-ray", x1: cx + 20 * Math.cos(a), y1: cy + 20 * Math.sin(a),
        x2: cx + 27 * Math.cos(a), y2: cy + 27 * Math.sin(a) }, g);
    }
  }

  function bulbIcon(g, cx, cy) {
    el("circle", { class: "bulb", cx, cy: cy - 4, r: 15 }, g);
    el("rect", { class: "bulb-base", x: cx - 7, y: cy + 10, width: 14, height: 9, rx: 2 }, g);
  }

  function fitText(text, maxWidth, minSize) {
    // Shrink a text until it fits its card (never below minSize): long unit names, narrow cards.
    // (An inline style: the stylesheet's font-size would win over a font-size attribute.)
    let size = parseFloat(getComputedStyle(text).fontSize);
    while (size > minSize && text.getComputedTextLength() > maxWidth) {
      size -= 1;
      text.style.fontSize = `${size}px`;
    }
  }

  function build(data) {
    const svg = $("diagram");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    measure();
    const defs = el("defs", {}, svg);
    const hatch = el("pattern", { id: "low-hatch", width: 8, height: 8, patternUnits: "userSpaceOnUse",
      patternTransform: "rotate(45)" }, defs);
    el("rect", { width: 8, height: 8, fill: "#f0e442" }, hatch);
    el("line", { x1: 0, y1: 0, x2: 0, y2: 8, stroke: "#0f1822", "stroke-width": 4 }, hatch);

    const boxes = layout(data.units);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.style.height = narrow ? `${H}px` : "";
    const flowLayer = el("g", { id: "flows" }, svg);
    if (narrow && boxes.lane !== undefined) {
      const houses = data.units.filter((u) => !u.is_plant && boxes[u.name]);
      const plant = data.units.find((u) => u.is_plant && boxes[u.name]);
      if (plant && houses.length) {
        const last = boxes[houses[houses.length - 1].name];
        const top = boxes[plant.name];
        el("path", { class: "trunk", d: `M${top.x - 2} ${top.y + top.h - 30} H${boxes.lane} V${last.y + 30}` }, flowLayer);
      }
    }
    const cardLayer = el("g", { id: "cards" }, svg);
    const labelLayer = el("g", { id: "flow-labels" }, svg);
    const cards = {};
    data.units.forEach((unit, index) => {
      const b = boxes[unit.name];
      if (!b) return;
      const colour = unitColour(unit.name, index);
      const g = el("g", { class: "unit", "data-unit": unit.name }, cardLayer);
      el("rect", { class: "card", x: b.x, y: b.y, width: b.w, height: b.h, rx: 14 }, g);
      el("rect", { class: "card-stripe", x: b.x + 1, y: b.y + 14, width: 7, height: b.h - 28, rx: 3, fill: colour }, g);
      if (unit.is_plant) plantIcon(g, b.x + 18, b.y + 8, colour);
      else houseIcon(g, b.x + 18, b.y + 10, colour);
      const name = el("text", { class: "unit-name", x: b.x + 66, y: b.y + 38 }, g, pretty(unit.name));
      fitText(name, b.w - 66 - 12, 16);
      const compact = unit.is_plant && !narrow; // the wide layout's plant card is low and wide
      const pillY = compact ? b.y + 52 : b.y + 54;
      const pillH = compact ? 38 : 48;
      const stateG = el("g", { class: "state state-unknown" }, g);
      el("rect", { class: "state-pill", x: b.x + 18, y: pillY, width: b.w - 32, height: pillH, rx: 10 }, stateG);
      const stateText = el("text", { class: "state-text", x: b.x + 18 + (b.w - 32) / 2, y: pillY + pillH / 2 },
        stateG, "NO READING");
      const stateTitle = el("title", {}, stateG, "");
      const barY = compact ? b.y + 98 : b.y + 114;
      const barW = compact ? 110 : Math.min(120, b.w - 110);
      const barX = b.x + 18;
      el("rect", { class: "battery-shell", x: barX, y: barY, width: barW, height: 24, rx: 4 }, g);
      el("rect", { class: "battery-nub", x: barX + barW, y: barY + 7, width: 5, height: 10, rx: 1 }, g);
      const fill = el("rect", { class: "battery-fill", x: barX + 3, y: barY + 3, width: 0, height: 18, rx: 2 }, g);
      const pct = el("text", { class: "battery-pct", x: barX + barW + 14, y: barY + 20 }, g, "– %");
      const low = el("text", { class: "battery-low", x: barX + barW - 6, y: barY + 18, "text-anchor": "end" }, g, "");
      const detail = el("text", { class: "unit-detail",
        x: compact ? b.x + b.w - 16 : barX, y: compact ? barY + 19 : b.y + b.h - 12,
        "text-anchor": compact ? "end" : "start" }, g, "");
      cards[unit.name] = { g, stateG, stateText, stateTitle, fill, pct, low, detail, barW, colour, pillW: b.w - 32,
        detailW: compact ? b.w - barW - 110 : b.w - 30, compact };
    });

    // Sun and load icons beside the units that measure them.
    const icons = {};
    for (const flow of data.flows) {
      if (flow.kind === "exchange") continue;
      const b = boxes[flow.unit];
      if (!b) continue;
      const gap = narrow ? ICON_GAP : 92;
      const outer = b.side < 0 ? b.x - gap : b.x + b.w + gap;
      const edge = b.side < 0 ? b.x - 2 : b.x + b.w + 2;
      const y = flow.kind === "solar" ? b.y + 34 : b.y + b.h - 62;
      const ig = el("g", { class: `icon icon-${flow.kind}` }, cardLayer);
      if (flow.kind === "solar") sunIcon(ig, outer, y);
      else bulbIcon(ig, outer, y);
      icons[`${flow.kind}:${flow.unit}`] = { x: outer, y, edge, side: b.side };
    }

    built = { key: layoutKey(data), boxes, cards, icons, flows: {}, flowLayer, labelLayer, plant: data.plant };
  }

  function layoutKey(data) {
    const screen = NARROW.matches ? `narrow:${Math.floor($("diagram").getBoundingClientRect().width)}` : "wide";
    return `${screen}|` + data.units.map((u) => `${u.name}/${u.is_plant}`).join(",") + "|" +
      data.flows.map((f) => `${f.kind}:${f.unit}`).join(",");
  }

  // ---- drawing a snapshot ---------------------------------------------------------------------
  function flowEls(key, kind) {
    let f = built.flows[key];
    if (!f) {
      const g = el("g", { class: `flow flow-${kind}`, "data-flow": key }, built.flowLayer);
      const line = el("line", { class: "flow-line still" }, g);
      const head = el("polygon", { class: "flow-head", visibility: "hidden" }, g);
      const lg = el("g", { class: "flow-label-group" }, built.labelLayer);
      const bg = el("rect", { class: "flow-label-bg", rx: 8 }, lg);
      const label = el("text", { class: "flow-label", "data-flow-label": key }, lg, "");
      f = { g, line, head, bg, label, tone: "", duration: "" };
      built.flows[key] = f;
    }
    return f;
  }

  function drawArrow(f, a, b, width, moving, tone, watts) {
    const dx = b.x - a.x;
    const dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    const ux = dx / len;
    const uy = dy / len;
    const headLen = Math.max(22, width * 1.5);
    const headHalf = Math.max(12, width * 1.05);
    const end = moving ? { x: b.x - ux * headLen * 0.85, y: b.y - uy * headLen * 0.85 } : b;
    f.line.setAttribute("x1", a.x.toFixed(1));
    f.line.setAttribute("y1", a.y.toFixed(1));
    f.line.setAttribute("x2", end.x.toFixed(1));
    f.line.setAttribute("y2", end.y.toFixed(1));
    f.line.setAttribute("stroke-width", moving ? width : 3);
    const short = len < 110 ? " short" : "";
    const cls = `flow-line${short} ${moving ? `moving ${tone}` : "still"}`;
    if (f.line.getAttribute("class") !== cls) f.line.setAttribute("class", cls);
    if (moving) {
      const bx = b.x - ux * headLen;
      const by = b.y - uy * headLen;
      f.head.setAttribute("points", [
        [b.x, b.y], [bx - uy * headHalf, by + ux * headHalf], [bx + uy * headHalf, by - ux * headHalf],
      ].map((p) => p.map((v) => v.toFixed(1)).join(",")).join(" "));
      f.head.setAttribute("class", `flow-head ${tone}`);
      f.head.setAttribute("visibility", "visible");
      // Faster dashes for more watts.
      const duration = `${Math.min(Math.max(1.6 - 0.25 * Math.sqrt(watts || 0), 0.45), 1.6).toFixed(1)}s`;
      if (duration !== f.duration) {
        f.line.style.animationDuration = duration;
        f.duration = duration;
      }
    } else {
      f.head.setAttribute("visibility", "hidden");
    }
  }

  function placeLabel(f, x, y, text, quiet, start) {
    // Centred on x (on x's right with `start`), kept inside the drawing.
    f.label.textContent = text;
    f.label.setAttribute("class", `flow-label${quiet ? " quiet" : ""}`);
    const w = Math.max(text.length * (quiet ? 10 : 14) + 18, 44);
    const h = quiet ? 28 : 34;
    if (start) x += w / 2;
    x = Math.min(Math.max(x, w / 2 + 2), W - w / 2 - 2);
    f.label.setAttribute("x", x.toFixed(1));
    f.label.setAttribute("y", y.toFixed(1));
    f.bg.setAttribute("x", (x - w / 2).toFixed(1));
    f.bg.setAttribute("y", (y - h / 2).toFixed(1));
    f.bg.setAttribute("width", w);
    f.bg.setAttribute("height", h);
  }

  function renderFlows(data) {
    const plantBox = built.boxes[data.plant];
    const seen = new Set();
    const units = Object.fromEntries(data.units.map((u) => [u.name, u]));
    // Houses without an exchange meter: a dotted line that says so.
    const links = data.flows.filter((f) => f.kind === "exchange");
    for (const u of data.units) {
      if (!u.is_plant && !u.has_exchange) {
        links.push({ kind: "exchange", unit: u.name, direction: "none", active: false, ok: true, unmetered: true });
      }
    }
    for (const flow of links) {
      const b = built.boxes[flow.unit];
      if (!b || !plantBox) continue;
      const key = `exchange:${flow.unit}`;
      seen.add(key);
      const f = flowEls(key, "exchange");
      const buying = flow.direction === "to_unit";
      const moving = flow.active && flow.direction !== "none";
      const tone = buying ? "flow-exchange-buy" : "flow-exchange-sell";
      let text;
      if (flow.unmetered) text = "trade not metered";
      else if (!flow.ok) text = "no reading";
      else if (!moving) text = "idle";
      else text = fmtW(flow.watts);
      if (narrow) {
        // From the line down the left to the card, at the height of the house's name.
        const plantPt = { x: built.boxes.lane, y: b.y + 30 };
        const housePt = { x: b.x - 3, y: b.y + 30 };
        const [a, z] = flow.direction === "from_unit" ? [housePt, plantPt] : [plantPt, housePt];
        drawArrow(f, a, z, Math.min(flow.width || 3, 14), moving, tone, flow.watts);
        placeLabel(f, b.x, b.y - LABEL_ROW / 2, moving ? `${buying ? "buys" : "sells"} ${text}` : text, !moving, true);
        f.g.dataset.direction = flow.direction;
        const unit = units[flow.unit];
        if (unit) f.g.dataset.state = unit.state;
        continue;
      }
      const hx = b.x + b.w / 2;
      const plantPt = { x: W / 2 + (hx - W / 2) * 0.32, y: plantBox.y + plantBox.h + 3 };
      const housePt = { x: hx, y: b.y - 3 };
      const [a, z] = flow.direction === "from_unit" ? [housePt, plantPt] : [plantPt, housePt];
      drawArrow(f, a, z, flow.width || 3, moving, tone, flow.watts);
      // The label sits beside the middle of the line.
      const mx = plantPt.x + (housePt.x - plantPt.x) * 0.42;
      const my = plantPt.y + (housePt.y - plantPt.y) * 0.42;
      let px = -(housePt.y - plantPt.y);
      let py = housePt.x - plantPt.x;
      const pl = Math.hypot(px, py) || 1;
      px /= pl; py /= pl;
      // Inner side (towards the middle), so the labels stay clear of the sun and load icons.
      if (px * (mx - W / 2) > 0 || (Math.abs(mx - W / 2) < 1 && px < 0)) { px = -px; py = -py; }
      const off = (moving ? (flow.width || 3) / 2 : 2) + 44;
      placeLabel(f, mx + px * off, my + py * off, text, !moving);
      f.g.dataset.direction = flow.direction;
      const unit = units[flow.unit];
      if (unit) f.g.dataset.state = unit.state;
    }
    for (const flow of data.flows) {
      if (flow.kind === "exchange") continue;
      const icon = built.icons[`${flow.kind}:${flow.unit}`];
      if (!icon) continue;
      const key = `${flow.kind}:${flow.unit}`;
      seen.add(key);
      const f = flowEls(key, flow.kind);
      const iconEdge = { x: icon.x - icon.side * 30, y: icon.y };
      const cardEdge = { x: icon.edge, y: icon.y };
      const moving = flow.active && flow.direction !== "none";
      const [a, z] = flow.kind === "solar" ? [iconEdge, cardEdge] : [cardEdge, iconEdge];
      drawArrow(f, a, z, Math.min(flow.width || 3, narrow ? 10 : 16), moving, `flow-${flow.kind}`, flow.watts);
      let text;
      if (!flow.ok) text = "no reading";
      else if (!moving) text = flow.idle_text || (flow.kind === "solar" ? "no sun" : "off");
      else text = fmtW(flow.watts);
      placeLabel(f, icon.x, icon.y + 46, text, !moving);
    }
    for (const [key, f] of Object.entries(built.flows)) {
      const hidden = seen.has(key) ? "visible" : "hidden";
      f.g.setAttribute("visibility", hidden);
      f.label.parentNode.setAttribute("visibility", hidden);
    }
  }

  function renderCards(data) {
    for (const unit of data.units) {
      const c = built.cards[unit.name];
      if (!c) continue;
      const word = STATE_WORDS[unit.state] || String(unit.state).toUpperCase();
      c.stateG.setAttribute("class", `state state-${String(unit.state).replace(/\s+/g, "-")}`);
      c.stateText.textContent = word;
      // Fit the word in its pill: bold capitals are about 0.78 em wide.
      const fit = (c.pillW - 18) / (word.length * 0.78);
      c.stateText.setAttribute("font-size", Math.min(unit.is_plant ? 25 : 29, fit).toFixed(1));
      let title = unit.state_text;
      if (unit.state_source === "battery" && !unit.is_plant) title += " (no trade meter: shown from the battery)";
      c.stateTitle.textContent = title;
      c.g.dataset.state = unit.state;
      const pct = unit.battery_pct;
      const inner = c.barW - 6;
      c.fill.setAttribute("width", pct === null ? 0 : ((inner * pct) / 100).toFixed(1));
      c.fill.setAttribute("class", `battery-fill${pct !== null && pct < 20 ? " low" : ""}`);
      // A battery nobody measures says so: never an empty bar that reads as 0 %.
      c.pct.textContent = unit.battery_measured === false ? "not measured" : pct === null ? "– %" : `${pct} %`;
      c.low.textContent = pct !== null && pct < 20 ? "LOW" : "";
      const parts = [];
      if (unit.battery_measured === false) {
        if (unit.panel_v !== null && unit.panel_v !== undefined) parts.push(`panel ${unit.panel_v.toFixed(1)} V`);
        if (unit.panel_power_w !== null && unit.panel_power_w !== undefined) parts.push(fmtW(unit.panel_power_w));
      } else {
        if (unit.battery_v !== null) parts.push(`${unit.battery_v.toFixed(2)} V`);
        const power = unit.battery_power_w !== null ? unit.battery_power_w
          : (unit.channels.find((ch) => ch.power_w !== null) || {}).power_w;
        if (power !== null && power !== undefined) parts.push(fmtSignedW(power));
      }
      c.detail.textContent = parts.join(" · ");
      c.detail.style.fontSize = "";
      fitText(c.detail, c.detailW, 12);
    }
  }

  // Today's energy per unit (the ledger's figures from the store): a figure no channel measures shows "–",
  // one with no reading yet "?", never 0.
  const TODAY_FIGURES = ["generated", "used", "sold", "bought"];
  function todayCell(figure) {
    if (!figure || figure.not_measured) return "–";
    if (figure.wh === null || figure.wh === undefined) return "?";
    return figure.wh < 10 ? figure.wh.toFixed(2) : figure.wh.toFixed(1);
  }
  function renderToday(today) {
    const box = $("today");
    if (!box) return;
    box.hidden = !today;
    if (!today) return;
    const body = box.querySelector("tbody");
    const rows = [];
    for (const [unit, figures] of Object.entries(today.units || {})) {
      const tr = document.createElement("tr");
      tr.dataset.unit = unit;
      const name = document.createElement("td");
      name.textContent = pretty(unit);
      tr.appendChild(name);
      for (const key of TODAY_FIGURES) {
        const td = document.createElement("td");
        td.dataset.figure = key;
        td.textContent = todayCell(figures[key]);
        if (figures[key] && figures[key].coverage !== null && figures[key].coverage !== undefined) {
          td.title = `${Math.round(figures[key].coverage * 100)} % of today measured`;
        }
        tr.appendChild(td);
      }
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // ---- status banner and freshness ------------------------------------------------------------
  let lastData = null;
  let lastVersion = null;
  let lastChangeAt = 0;
  let typicalGap = 10000;

  function renderStatus() {
    const banner = $("status");
    const icon = $("status-icon");
    const meaning = $("status-meaning");
    const summary = $("status-summary");
    if (!lastData || lastData.time_ms === null) {
      banner.className = "status level-wait";
      icon.textContent = "…";
      meaning.textContent = "Waiting for the first reading…";
      summary.textContent = "";
      return;
    }
    const stale = Date.now() - lastChangeAt > Math.max(60000, 3 * typicalGap);
    if (stale) {
      banner.className = "status level-stale";
      icon.textContent = "?";
      meaning.textContent = `No new readings since ${clock(lastData.time_ms)}.`;
      summary.textContent = "Is the logger running? The page keeps trying.";
      return;
    }
    const s = lastData.status;
    banner.className = `status level-${s.level}`;
    icon.textContent = s.level === "ok" ? "✓" : s.level === "critical" ? "✕" : "!";
    meaning.textContent = s.meaning || (s.level === "ok" ? "All well: measuring normally." : "A problem was reported.");
    summary.textContent = s.level === "ok" ? "" : s.summary;
  }

  function handle(data) {
    if (!data || !Array.isArray(data.units)) return;
    if (!built || built.key !== layoutKey(data)) build(data);
    if (data.version !== lastVersion) {
      const now = Date.now();
      if (lastVersion !== null && lastChangeAt) typicalGap = Math.min(Math.max(now - lastChangeAt, 1000), 600000);
      lastChangeAt = now;
      lastVersion = data.version;
    }
    lastData = data;
    $("site-name").textContent = data.site || "Solar co-op";
    $("updated").textContent = data.time_ms === null ? "—" : clock(data.time_ms);
    renderCards(data);
    renderFlows(data);
    renderStatus();
    renderPiPower(data.pi);
    renderToday(data.today);
    document.body.dataset.version = String(data.version);
  }

  // The Pi's own supply, from the firmware's flags (absent off a Pi: "not measured").
  function renderPiPower(pi) {
    let node = $("pi-power");
    if (!node) {
      node = document.createElement("div");
      node.id = "pi-power";
      const header = document.querySelector("header");
      if (!header) return;
      header.appendChild(node);
    }
    let text = "Pi supply: not measured";
    let level = "unknown";
    if (pi && pi.undervoltage !== null && pi.undervoltage !== undefined) {
      const words = [pi.undervoltage ? "UNDER-VOLTAGE" : "ok"];
      if (pi.throttled) words.push("CPU throttled");
      else if (pi.throttled === false) words.push("not throttled");
      if (!pi.undervoltage && pi.undervoltage_since_boot) words.push("under-voltage earlier");
      text = `Pi supply: ${words.join(" · ")}`;
      level = pi.undervoltage || pi.throttled ? "bad" : "ok";
    }
    node.textContent = text;
    node.className = `pi-power pi-${level}`;
  }

  // ---- live updates: server-sent events, else polling ----------------------------------------
  let source = null;
  let pollTimer = null;
  let failures = 0;

  function poll() {
    fetch("/api/now", { cache: "no-store" })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
      .then(handle)
      .catch(() => renderStatus());
  }

  function startPolling() {
    document.body.dataset.live = "poll";
    if (pollTimer === null) pollTimer = setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  function connect() {
    if (!("EventSource" in window)) {
      startPolling();
      return;
    }
    source = new EventSource("/api/events");
    source.onopen = () => {
      failures = 0;
      stopPolling();
      document.body.dataset.live = "sse";
    };
    source.onmessage = (event) => {
      failures = 0;
      try {
        handle(JSON.parse(event.data));
      } catch (err) {
        /* a broken message: the next one will do */
      }
    };
    source.onerror = () => {
      failures += 1;
      if (source.readyState === EventSource.CLOSED || failures >= 3) {
        source.close();
        source = null;
        startPolling();
        setTimeout(connect, SSE_RETRY_MS);
      }
    };
  }

  // ---- the 24-hour chart ----------------------------------------------------------------------
  function niceStep(span, count) {
    const raw = span / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  let lastHistory;

  function drawChart(data) {
    lastHistory = data;
    const svg = $("chart");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    // Drawn at 1 unit = 1 CSS px whatever the screen, so its text keeps its size.
    const box = svg.getBoundingClientRect();
    const VW = Math.max(Math.floor(box.width), 240);
    const VH = Math.max(Math.floor(box.height), 120);
    svg.setAttribute("viewBox", `0 0 ${VW} ${VH}`);
    const L = 58;
    const R = VW < 600 ? 128 : 150;
    const T = 10;
    const B = 24;
    const series = (data && data.series) || [];
    if (series.length && series.every((s) => s.role === "solar")) {
      // The real model measures only its panels: the chart shows what they give.
      $("chart-what").textContent = "solar panel power of each unit";
      const hint = document.querySelector(".chart-box .hint");
      if (hint) hint.textContent = "(watts the panel gives its battery)";
    }
    const values = series.flatMap((s) => s.values.filter((v) => v !== null));
    if (!values.length) {
      let why = "The history cannot be read right now.";
      if (data && data.available === false) why = "This logger keeps no history for the page.";
      else if (data) why = "No readings stored in the last 24 hours yet.";
      fitText(el("text", { class: "chart-empty", x: VW / 2, y: VH / 2 }, svg, why), VW - 20, 12);
      return;
    }
    let lo = Math.min(0, ...values);
    let hi = Math.max(0, ...values);
    if (hi - lo < 0.5) { hi += 0.25; lo -= 0.25; }
    const step = niceStep(hi - lo, 4);
    lo = Math.floor(lo / step) * step;
    hi = Math.ceil(hi / step) * step;
    const x = (t) => L + ((t - data.start_ms) / (data.end_ms - data.start_ms)) * (VW - L - R);
    const y = (v) => T + ((hi - v) / (hi - lo)) * (VH - T - B);
    const axes = el("g", {}, svg);
    const decimals = step < 1 ? (step < 0.1 ? 2 : 1) : 0;
    for (let v = lo; v <= hi + step / 2; v += step) {
      const zero = Math.abs(v) < step / 1000;
      el("line", { class: zero ? "axis-zero" : "axis-line", x1: L, x2: VW - R, y1: y(v), y2: y(v) }, axes);
      el("text", { class: "axis-text", x: L - 8, y: y(v) + 5, "text-anchor": "end" }, axes,
        `${(zero ? 0 : v).toFixed(decimals)} W`);
    }
    const tick = new Date(data.start_ms);
    tick.setMinutes(0, 0, 0);
    const every = VW - L - R < 480 ? 6 : 3; // hours between ticks: the labels must not overlap
    while (tick.getTime() < data.start_ms || tick.getHours() % every !== 0) tick.setHours(tick.getHours() + 1);
    for (; tick.getTime() <= data.end_ms; tick.setHours(tick.getHours() + every)) {
      const tx = x(tick.getTime());
      el("line", { class: "axis-line", x1: tx, x2: tx, y1: T, y2: VH - B }, axes);
      el("text", { class: "axis-text", x: tx, y: VH - 6, "text-anchor": "middle" }, axes,
        `${pad(tick.getHours())}:00`);
    }
    const labels = [];
    series.forEach((s, i) => {
      const colour = unitColour(s.unit, i);
      let d = "";
      let pen = false;
      let last = null;
      s.values.forEach((v, k) => {
        if (v === null) { pen = false; return; }
        const px = x(data.start_ms + (k + 0.5) * data.bucket_s * 1000).toFixed(1);
        const py = y(v).toFixed(1);
        d += `${pen ? "L" : "M"}${px} ${py} `;
        pen = true;
        last = { x: Number(px), y: Number(py) };
      });
      if (!d) return;
      const path = el("path", { class: "series", d, stroke: colour, "data-unit": s.unit }, svg);
      if (DASHES[i % DASHES.length]) path.setAttribute("stroke-dasharray", DASHES[i % DASHES.length]);
      labels.push({ y: last.y, x: last.x, colour, dash: DASHES[i % DASHES.length],
        text: pretty(s.unit) + (s.role === "battery" || series.every((x) => x.role === "solar") ? "" : ` (${s.role})`) });
    });
    labels.sort((a, b) => a.y - b.y);
    for (let k = 1; k < labels.length; k += 1) labels[k].ly = Math.max(labels[k].y, (labels[k - 1].ly ?? labels[k - 1].y) + 18);
    if (labels.length) labels[0].ly = labels[0].y;
    const overflow = labels.length ? labels[labels.length - 1].ly - (VH - B) : 0;
    for (const lab of labels) {
      const ly = Math.max(lab.ly - Math.max(overflow, 0), T + 6);
      const gap = VW < 600 ? 16 : 30;
      const line = el("line", { x1: lab.x, y1: lab.y, x2: VW - R + gap, y2: ly, stroke: lab.colour, "stroke-width": 2.6 }, svg);
      if (lab.dash) line.setAttribute("stroke-dasharray", lab.dash);
      const text = el("text", { class: "series-label", x: VW - R + gap + 6, y: ly, fill: lab.colour }, svg, lab.text);
      fitText(text, R - gap - 8, 12);
    }
  }

  function loadHistory() {
    fetch("/api/history?hours=24")
      .then((r) => (r.ok ? r.json() : null))
      .then(drawChart)
      .catch(() => drawChart(null));
  }

  // ---- start ----------------------------------------------------------------------------------
  let resizeTimer = null;

  function relayout() {
    // A rotated phone or a resized window: redraw both drawings for the new size.
    if (lastData && built && built.key !== layoutKey(lastData)) handle(lastData);
    if (lastHistory !== undefined) drawChart(lastHistory);
  }

  function start() {
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(relayout, 150);
    });
    poll(); // draws the diagram at once, even before the first update
    connect();
    loadHistory();
    setInterval(loadHistory, HISTORY_MS);
    setInterval(renderStatus, 5000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
