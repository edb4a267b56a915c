// Canvas plotting for the dashboard: axes with nice ticks, a pixel-binned scatter (so 100,000
// points draw in milliseconds and look exactly as if all were drawn), step lines, markers.

const FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
const GRID = "#edf0f4";
const AXIS = "#c5ccd6";
const TEXT = "#667085";

// Round tick positions covering [lo, hi] with about `count` intervals.
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  const start = Math.ceil(lo / step - 1e-9) * step;
  const ticks = [];
  for (let v = start; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(12));
  return { step, ticks };
}

// A duration in seconds as a short label ("45 s", "12 min", "3.5 h").
export function formatDuration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "—";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${+(seconds / 60).toFixed(seconds < 600 ? 1 : 0)} min`;
  if (seconds < 172800) return `${+(seconds / 3600).toFixed(1)} h`;
  return `${+(seconds / 86400).toFixed(1)} d`;
}

// Time ticks in the unit that suits the range (seconds, minutes or hours).
export function timeTicks(lo, hi) {
  const unit = hi < 180 ? [1, "s"] : hi < 3 * 3600 ? [60, "min"] : [3600, "h"];
  const { ticks } = niceTicks(lo / unit[0], hi / unit[0], 6);
  return { ticks: ticks.map((t) => t * unit[0]), label: (v) => `${+(v / unit[0]).toFixed(2)} ${unit[1]}` };
}

export class Plot {
  constructor(canvas, margin = { left: 58, right: 18, top: 14, bottom: 38 }) {
    this.canvas = canvas;
    this.margin = margin;
    this.hits = null; // Int32Array: point index + 1 per CSS pixel, for hover
  }

  // Size the backing store to the element's CSS size times the device pixel ratio.
  begin() {
    const dpr = window.devicePixelRatio || 1;
    const rect = this.canvas.getBoundingClientRect();
    this.w = Math.max(200, Math.round(rect.width));
    this.h = Math.max(120, Math.round(rect.height));
    if (this.canvas.width !== Math.round(this.w * dpr) || this.canvas.height !== Math.round(this.h * dpr)) {
      this.canvas.width = Math.round(this.w * dpr);
      this.canvas.height = Math.round(this.h * dpr);
    }
    const ctx = (this.ctx = this.canvas.getContext("2d"));
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, this.w, this.h);
    ctx.font = FONT;
    const m = this.margin;
    this.x0 = m.left; this.x1 = this.w - m.right; this.y0 = this.h - m.bottom; this.y1 = m.top;
    this.hits = new Int32Array(this.w * this.h);
    return ctx;
  }

  setRange(xmin, xmax, ymin, ymax) {
    this.xmin = xmin; this.xmax = xmax > xmin ? xmax : xmin + 1;
    this.ymin = ymin; this.ymax = ymax > ymin ? ymax : ymin + 1;
  }

  x(v) { return this.x0 + ((v - this.xmin) / (this.xmax - this.xmin)) * (this.x1 - this.x0); }
  y(v) { return this.y0 - ((v - this.ymin) / (this.ymax - this.ymin)) * (this.y0 - this.y1); }

  // Grid, tick labels and axis titles.
  axes({ xticks, xlabel, yticks, ylabel, xfmt = String, yfmt = String }) {
    const ctx = this.ctx;
    ctx.lineWidth = 1;
    ctx.strokeStyle = GRID;
    ctx.fillStyle = TEXT;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of yticks) {
      const py = Math.round(this.y(t)) + 0.5;
      ctx.beginPath(); ctx.moveTo(this.x0, py); ctx.lineTo(this.x1, py); ctx.stroke();
      ctx.fillText(yfmt(t), this.x0 - 7, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    let lastRight = -Infinity;
    for (const t of xticks) {
      const px = Math.round(this.x(t)) + 0.5;
      if (px < this.x0 - 1 || px > this.x1 + 1) continue;
      ctx.beginPath(); ctx.moveTo(px, this.y1); ctx.lineTo(px, this.y0); ctx.stroke();
      const label = xfmt(t);
      const half = ctx.measureText(label).width / 2;
      const lx = Math.min(px, this.w - 2 - half);  // the last label stays inside the canvas
      if (lx - half > lastRight + 6) { ctx.fillText(label, lx, this.y0 + 7); lastRight = lx + half; }
    }
    ctx.strokeStyle = AXIS;
    ctx.beginPath(); ctx.moveTo(this.x0, this.y1); ctx.lineTo(this.x0, this.y0 + 0.5); ctx.lineTo(this.x1, this.y0 + 0.5); ctx.stroke();
    ctx.fillStyle = TEXT;
    ctx.textBaseline = "bottom";
    ctx.fillText(xlabel, (this.x0 + this.x1) / 2, this.h - 1);
    ctx.save();
    ctx.translate(13, (this.y0 + this.y1) / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textBaseline = "middle";
    ctx.fillText(ylabel, 0, 0);
    ctx.restore();
  }

  // Light band behind a stretch of the x axis (e.g. the merging phase).
  shade(xa, xb, color) {
    const a = Math.max(this.x0, this.x(xa)), b = Math.min(this.x1, this.x(xb));
    if (b <= a) return;
    this.ctx.fillStyle = color;
    this.ctx.fillRect(a, this.y1, b - a, this.y0 - this.y1);
  }

  // Points (xs[i], ys[i]) for i in `indices`, one mark per occupied cell of `cell` pixels.
  // Returns how many marks were drawn. Failed points (y null) go on the bottom edge as crosses.
  scatter(xs, ys, indices, { color, radius = 2.4, alpha = 0.75, failColor = "#dc2626" }) {
    const ctx = this.ctx, w = this.w, hits = this.hits;
    const dense = indices.length > 3000;
    const cell = dense ? 2 : 1;
    const cols = Math.ceil(w / cell) + 1;
    const seen = new Uint8Array(cols * (Math.ceil(this.h / cell) + 1));
    const kx = (this.x1 - this.x0) / (this.xmax - this.xmin), ky = (this.y0 - this.y1) / (this.ymax - this.ymin);
    let drawn = 0;
    ctx.globalAlpha = dense ? Math.min(alpha, 0.55) : alpha;
    ctx.fillStyle = color;
    ctx.beginPath();
    const fails = [];
    for (let k = 0; k < indices.length; k++) {
      const i = indices[k];
      const v = ys[i];
      if (v == null) { fails.push(i); continue; }
      const px = this.x0 + (xs[i] - this.xmin) * kx, py = this.y0 - (v - this.ymin) * ky;
      if (px < this.x0 - 1 || px > this.x1 + 1 || py < this.y1 - 1 || py > this.y0 + 1) continue;
      const cx = (px / cell) | 0, cy = (py / cell) | 0, key = cy * cols + cx;
      const hx = px | 0, hy = py | 0;
      hits[hy * w + hx] = i + 1;
      if (seen[key]) continue;
      seen[key] = 1;
      drawn++;
      if (dense) { ctx.rect(px - 1.2, py - 1.2, 2.4, 2.4); }
      else { ctx.moveTo(px + radius, py); ctx.arc(px, py, radius, 0, 2 * Math.PI); }
    }
    ctx.fill();
    ctx.globalAlpha = 1;
    if (fails.length) {
      // Failures have no score: a strip of marks along the bottom edge, crosses when few.
      const many = fails.length > 150;
      ctx.strokeStyle = failColor;
      ctx.lineWidth = many ? 1 : 1.2;
      ctx.globalAlpha = many ? 0.6 : 1;
      ctx.beginPath();
      const py = this.y0 - 4;
      let lastPx = -10;
      for (const i of fails) {
        const px = this.x(xs[i]);
        hits[(py | 0) * w + (px | 0)] = i + 1;
        if (px - lastPx < (many ? 2 : 3)) continue;
        lastPx = px;
        if (many) { ctx.moveTo(px, py - 3); ctx.lineTo(px, py + 3); }
        else { ctx.moveTo(px - 3, py - 3); ctx.lineTo(px + 3, py + 3); ctx.moveTo(px - 3, py + 3); ctx.lineTo(px + 3, py - 3); }
        drawn++;
      }
      ctx.stroke();
      ctx.globalAlpha = 1;
    }
    return drawn;
  }

  // A step line through [[x, y], ...]: holds each y until the next x (best-so-far).
  steps(points, xEnd, { color, width = 2.5 }) {
    if (!points.length) return;
    const ctx = this.ctx;
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(this.x(points[0][0]), this.y(points[0][1]));
    for (let k = 1; k < points.length; k++) {
      ctx.lineTo(this.x(points[k][0]), this.y(points[k - 1][1]));
      ctx.lineTo(this.x(points[k][0]), this.y(points[k][1]));
    }
    ctx.lineTo(this.x(Math.max(xEnd, points[points.length - 1][0])), this.y(points[points.length - 1][1]));
    ctx.stroke();
  }

  // A dashed vertical line with a label at its top.
  vline(xv, label, color) {
    const ctx = this.ctx, px = Math.round(this.x(xv)) + 0.5;
    if (px < this.x0 || px > this.x1) return;
    ctx.save();
    ctx.strokeStyle = color; ctx.lineWidth = 1.4; ctx.setLineDash([5, 4]);
    ctx.beginPath(); ctx.moveTo(px, this.y1); ctx.lineTo(px, this.y0); ctx.stroke();
    ctx.restore();
    ctx.fillStyle = color; ctx.textBaseline = "top"; ctx.font = "600 " + FONT;
    const wText = ctx.measureText(label).width;
    const right = px + 6 + wText < this.x1;
    ctx.textAlign = right ? "left" : "right";
    ctx.fillText(label, right ? px + 6 : px - 6, this.y1 + 4);
    ctx.font = FONT;
  }

  // A dashed horizontal reference line labelled at the right end, above the line.
  hline(yv, label, color) {
    const ctx = this.ctx, py = Math.round(this.y(yv)) + 0.5;
    if (py < this.y1 || py > this.y0) return;
    ctx.save();
    ctx.strokeStyle = color; ctx.lineWidth = 1.2; ctx.setLineDash([3, 4]);
    ctx.beginPath(); ctx.moveTo(this.x0, py); ctx.lineTo(this.x1, py); ctx.stroke();
    ctx.restore();
    ctx.fillStyle = color; ctx.textAlign = "right"; ctx.textBaseline = "bottom";
    ctx.fillText(label, this.x1 - 4, py - 3);
  }

  // Larger marks: "diamond" or "square", with a white ring so they stand out of the cloud.
  // Each point is [x, y, ref]; hover finds -(ref + 1) for it.
  markers(points, shape, color) {
    const ctx = this.ctx;
    for (const [xv, yv, idx] of points) {
      const px = this.x(xv), py = this.y(yv), r = 5;
      ctx.beginPath();
      if (shape === "diamond") { ctx.moveTo(px, py - r - 1); ctx.lineTo(px + r + 1, py); ctx.lineTo(px, py + r + 1); ctx.lineTo(px - r - 1, py); ctx.closePath(); }
      else { ctx.rect(px - r, py - r, 2 * r, 2 * r); }
      ctx.fillStyle = color; ctx.strokeStyle = "#fff"; ctx.lineWidth = 1.5;
      ctx.fill(); ctx.stroke();
      if (idx != null) this.hits[(py | 0) * this.w + (px | 0)] = -(idx + 1);
    }
  }

  // The point nearest to CSS pixel (mx, my) within `radius`: index (negative: a marker), or 0.
  hitTest(mx, my, radius = 7) {
    if (!this.hits) return 0;
    let best = 0, bestD = radius * radius + 1;
    for (let dy = -radius; dy <= radius; dy++) {
      const y = (my | 0) + dy;
      if (y < 0 || y >= this.h) continue;
      for (let dx = -radius; dx <= radius; dx++) {
        const x = (mx | 0) + dx;
        if (x < 0 || x >= this.w) continue;
        const v = this.hits[y * this.w + x];
        if (v !== 0 && dx * dx + dy * dy < bestD) { bestD = dx * dx + dy * dy; best = v; }
      }
    }
    return best;
  }
}
