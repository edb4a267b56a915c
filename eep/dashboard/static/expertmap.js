// The best candidate's expert map: one small heatmap per MoE layer, rows = kept experts (slots),
// columns = original experts; a cell is how much slot i draws from original expert j.

const WHITE = [248, 250, 252];
const BLUE = [29, 63, 154];
const RED = [180, 35, 24];

function mix(a, b, t) {
  return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * t)).join(",")})`;
}

// Colour of value v given the largest magnitude in the candidate (white = 0).
function colour(v, maxAbs) {
  const t = Math.pow(Math.min(1, Math.abs(v) / maxAbs), 0.75);
  return mix(WHITE, v < 0 ? RED : BLUE, t);
}

// Draw every layer of `best` (as /api/runs/<run>/best returns it) into `container`.
// `which` is "expert_merge" or "router_map". Returns the number of layers drawn.
export function renderExpertMap(container, scaleEl, best, which) {
  container.replaceChildren();
  scaleEl.replaceChildren();
  if (!best || !best.layers) return 0;
  const layers = best.layers.map((l) => l[which]);
  let maxAbs = 0, negative = false;
  for (const m of layers) for (const row of m) for (const v of row) {
    maxAbs = Math.max(maxAbs, Math.abs(v));
    if (v < -1e-9) negative = true;
  }
  maxAbs = maxAbs || 1;
  const experts = best.num_experts;
  const cell = Math.max(3, Math.min(20, Math.floor(200 / experts)));
  const dpr = window.devicePixelRatio || 1;
  layers.forEach((matrix, l) => {
    const keep = matrix.length;
    const box = document.createElement("div");
    box.className = "layer";
    const name = document.createElement("div");
    name.className = "name";
    const b = document.createElement("b");
    b.textContent = `L${l}`;
    const kept = document.createElement("span");
    kept.textContent = (best.kept?.[l] || []).join(" · ");
    kept.title = "dominant original expert of each kept expert";
    name.append(b, kept);
    const canvas = document.createElement("canvas");
    const w = experts * cell, h = keep * cell;
    canvas.width = w * dpr; canvas.height = h * dpr;
    canvas.style.width = `${w}px`; canvas.style.height = `${h}px`;
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    for (let i = 0; i < keep; i++) {
      for (let j = 0; j < experts; j++) {
        ctx.fillStyle = colour(matrix[i][j], maxAbs);
        ctx.fillRect(j * cell, i * cell, cell, cell);
      }
    }
    if (cell >= 6) {  // faint cell borders help read one-hot rows
      ctx.strokeStyle = "rgba(100,116,139,.14)";
      ctx.lineWidth = 1;
      for (let j = 1; j < experts; j++) { ctx.beginPath(); ctx.moveTo(j * cell + 0.5, 0); ctx.lineTo(j * cell + 0.5, h); ctx.stroke(); }
      for (let i = 1; i < keep; i++) { ctx.beginPath(); ctx.moveTo(0, i * cell + 0.5); ctx.lineTo(w, i * cell + 0.5); ctx.stroke(); }
    }
    canvas.addEventListener("mousemove", (ev) => {
      const j = Math.floor(ev.offsetX / cell), i = Math.floor(ev.offsetY / cell);
      if (i >= 0 && i < keep && j >= 0 && j < experts) {
        canvas.title = `layer ${l}: kept expert ${i} ← original expert ${j}: ${matrix[i][j].toFixed(3)}`;
      }
    });
    box.append(name, canvas);
    container.append(box);
  });
  const lo = document.createElement("span");
  lo.textContent = negative ? (-maxAbs).toFixed(2) : "0";
  const ramp = document.createElement("span");
  ramp.className = "ramp " + (negative ? "diverging" : "sequential");
  const hi = document.createElement("span");
  hi.textContent = maxAbs.toFixed(2);
  const note = document.createElement("span");
  note.textContent = "rows: kept experts · columns: original experts 0–" + (experts - 1) + " · hover a cell for its value";
  scaleEl.append(lo, ramp, hi, note);
  container.dataset.layers = String(layers.length);
  return layers.length;
}
