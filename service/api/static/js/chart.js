// Loss curves with uPlot (vendored): training and validation loss against the step.

import uPlot from "../vendor/uPlot.esm.js";

export class LossChart {
  constructor(el) {
    this.el = el;
    this.steps = [];
    this.train = new Map(); // step → loss
    this.valid = new Map();
    this.plot = null;
    this.pending = false;
    this.resize = () => this.plot && this.plot.setSize(this.size());
    window.addEventListener("resize", this.resize);
  }

  size() {
    return { width: Math.max(320, this.el.clientWidth || 640), height: 300 };
  }

  /** Take one event's data: {step, train_loss} or {step, valid_loss}. */
  add(data) {
    const step = data?.step;
    if (typeof step !== "number") return false;
    let changed = false;
    if (typeof data.train_loss === "number") { this.train.set(step, data.train_loss); changed = true; }
    if (typeof data.valid_loss === "number") { this.valid.set(step, data.valid_loss); changed = true; }
    if (changed && !this.pending) {
      // Many events arrive at once on catch-up: draw once per frame.
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
    return changed;
  }

  get points() { return { train: this.train.size, valid: this.valid.size }; }

  draw() {
    const steps = [...new Set([...this.train.keys(), ...this.valid.keys()])].sort((a, b) => a - b);
    const data = [steps, steps.map((s) => this.train.get(s) ?? null), steps.map((s) => this.valid.get(s) ?? null)];
    this.el.dataset.trainPoints = String(this.train.size);
    this.el.dataset.validPoints = String(this.valid.size);
    if (!this.plot) {
      this.plot = new uPlot({
        ...this.size(),
        title: "Loss",
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { label: "loss" }],
        series: [
          { label: "step" },
          { label: "training", stroke: "#0b57d0", width: 2, spanGaps: true, points: { show: true, size: 5 } },
          { label: "validation", stroke: "#b3261e", width: 2, dash: [6, 4], spanGaps: true, points: { show: true, size: 7 } },
        ],
      }, data, this.el);
    } else {
      this.plot.setData(data);
    }
  }

  destroy() {
    window.removeEventListener("resize", this.resize);
    if (this.plot) this.plot.destroy();
  }
}
