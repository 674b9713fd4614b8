// Pure logic of the frontend extension, run with Node's built-in test runner: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  batchOrder, batchesPerPass, batchesPerStep, blockBatchShape, estimateImageSize, formatBytes, formatPlan, gridLayout,
  lastPass, modelCalls, passCount, planQuery, progressEntries, progressState, resolveNode, traversalAxis,
  wiredSampling,
} from "../../web/js/uniba_logic.js";

/** The row-major order of [n_h, n_w] batches over a rows x cols grid, as [row, col, rows, cols] rectangles. */
function rowMajor(rows, cols, nh, nw) {
  const order = [];
  for (let r = 0; r < rows; r += nh) {
    for (let c = 0; c < cols; c += nw) order.push([r, c, Math.min(nh, rows - r), Math.min(nw, cols - c)]);
  }
  return order;
}

// the shape of uniba.infdit.plan.UpscalePlan.to_dict() (a 384x256 input, 4x) as the route sends it
const PASS_4X = { scale: 4, in_height: 256, in_width: 384, padded_height: 256, padded_width: 384, out_height: 1024,
  out_width: 1536, canvas_height: 1024, canvas_width: 1536, grid_rows: 8, grid_cols: 12, traversal: "row-major",
  block_batch: [2, 4], offload_cache: false, batches_per_step: 12, cache_bytes: 3 * 2 ** 30,
  peak_bytes: 9.5 * 2 ** 30, minimum_bytes: 3 * 2 ** 30, block_order: rowMajor(8, 12, 2, 4) };
const PASS_1 = { ...PASS_4X, out_height: 256, out_width: 384, canvas_height: 256, canvas_width: 384, grid_rows: 2,
  grid_cols: 3, block_batch: [2, 3], batches_per_step: 1, block_order: rowMajor(2, 3, 2, 3) };
const PLAN = {
  scale: 4, passes: [PASS_4X], block_px: 128, evaluations: 39, sigmas: [], peak_bytes: 9.5 * 2 ** 30,
  minimum_bytes: 3 * 2 ** 30, weights_bytes: 2 * 2 ** 30, free_bytes: 11 * 2 ** 30, usable_bytes: 9 * 2 ** 30,
  fits: true, weights_resident: false, rope_wraps: false, rope_max_side_px: 4096, description: "",
  model: "release", dtype: "bfloat16", device: "cuda:0",
};

test("formatBytes picks binary units", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(1536), "1.5 KiB");
  assert.equal(formatBytes(9.5 * 2 ** 30), "9.5 GiB");
  assert.equal(formatBytes(300 * 2 ** 20), "300 MiB");
  assert.equal(formatBytes(undefined), "?");
  assert.equal(formatBytes(-2048), "-2.0 KiB");
});

test("traversal and block batch shapes come from the last pass", () => {
  assert.equal(traversalAxis("row-major"), "rows");
  assert.equal(traversalAxis("column-major"), "columns");
  assert.deepEqual(blockBatchShape(PLAN), [2, 4]);
  assert.equal(batchesPerStep(PLAN), 12);
  assert.equal(lastPass({ ...PLAN, passes: [PASS_1, PASS_4X] }), PASS_4X);
});

test("batch order is the planner's block_order, every block once", () => {
  const order = batchOrder(PLAN);
  assert.equal(order.length, 12);
  const seen = new Set(order.flat().map(([r, c]) => `${r},${c}`));
  assert.equal(seen.size, 96);
  assert.equal(order.flat().length, 96);
  assert.deepEqual(order[1][0], [0, 4]);
});

test("passes and model calls", () => {
  assert.equal(passCount(PLAN), 1);
  assert.equal(modelCalls(PLAN), 39);
  assert.deepEqual(batchesPerPass({ ...PLAN, passes: [PASS_1, PASS_4X] }), [1, 12]);
});

test("progress ticks per block batch per model call mark exactly the finished batches", () => {
  const calls = 39;
  const max = calls * 12;
  const start = progressState(PLAN, 0, max);
  assert.equal(start.doneBatches, 0);
  assert.equal(start.call, 1);
  assert.equal(start.calls, 39);
  assert.ok(start.done.flat().every((d) => !d));

  // third model call, five batches done: rows 0-1 fully (3 batches of 2x4 = 12 cols) + 2 batches of rows 2-3
  const mid = progressState(PLAN, 2 * 12 + 5, max);
  assert.equal(mid.call, 3);
  assert.equal(mid.doneBatches, 5);
  assert.equal(mid.done.flat().filter(Boolean).length, 5 * 8);
  assert.equal(mid.done[0][11], true);
  assert.equal(mid.done[3][7], true);
  assert.equal(mid.done[3][8], false);
  assert.equal(mid.done[4][0], false);

  const end = progressState(PLAN, max, max);
  assert.equal(end.call, calls);
  assert.ok(end.done.flat().every(Boolean));
});

test("coarse or overflowing progress stays in range; earlier passes leave the last grid empty", () => {
  const coarse = progressState(PLAN, 1, 2); // half way
  assert.ok(coarse.call >= 19 && coarse.call <= 21);
  const over = progressState(PLAN, 25, 20);
  assert.ok(over.done.flat().every(Boolean));
  const twoPass = { ...PLAN, passes: [PASS_1, PASS_4X] };
  // pass 1 has 1 batch per call (39 ticks), pass 2 has 12 per call (468 ticks)
  const first = progressState(twoPass, 20, 39 + 468);
  assert.equal(first.pass, 1);
  assert.equal(first.passes, 2);
  assert.ok(first.done.flat().every((d) => !d));
  const second = progressState(twoPass, 39 + 12 + 3, 39 + 468);
  assert.equal(second.pass, 2);
  assert.equal(second.call, 2);
  assert.equal(second.doneBatches, 3);
});

test("grid layout keeps the aspect ratio and fits the box", () => {
  const g = gridLayout(PLAN, 240, 100);
  assert.equal(g.cell, 12); // min(240/12, 100/8) -> 12
  assert.equal(g.cells.length, 96);
  assert.equal(g.width, 144);
  assert.equal(g.height, 96);
  for (const c of g.cells) {
    assert.ok(c.x >= 0 && c.y >= 0 && c.x + c.w <= 240 && c.y + c.h <= 100);
  }
  const last = g.cells[g.cells.length - 1];
  assert.equal(last.row, 7);
  assert.equal(last.col, 11);
  assert.equal(last.x, g.x + 11 * 12);
});

test("formatPlan reports grid, batch, passes, peak and fit", () => {
  const out = formatPlan(PLAN);
  assert.equal(out.fits, true);
  const text = out.lines.join("\n");
  assert.match(text, /1536×1024 px, 1 pass \(4x\)/);
  assert.match(text, /Blocks 12×8 of 128 px/);
  assert.match(text, /Block batch 4×2 \(12 per model call, 39 model calls\), KV cache on cuda$/m);
  assert.match(text, /Peak ≈ 9\.5 GiB/);
  assert.match(text, /Fits: 11\.0 GiB free/);

  // weights already resident: a peak above "free" is explained, not a bare "fits"
  const resident = formatPlan({ ...PLAN, weights_resident: true, free_bytes: 8 * 2 ** 30 });
  assert.equal(resident.fits, true);
  assert.match(resident.lines.join("\n"), /Fits: the work \(.+\) fits in 8\.0 GiB free; the weights are already loaded/);

  const tooBig = formatPlan({ ...PLAN, fits: false, free_bytes: 4 * 2 ** 30,
    passes: [PASS_4X, { ...PASS_4X, offload_cache: true }], rope_wraps: true });
  assert.equal(tooBig.status, "too-big");
  assert.match(tooBig.lines.join("\n"), /Does not fit: 4\.0 GiB free/);
  assert.match(tooBig.lines.join("\n"), /2 passes \(4x \+ 4x\)/);
  assert.match(tooBig.lines.join("\n"), /positions wrap/);
  assert.match(tooBig.lines.join("\n"), /offloaded to host RAM/);
  assert.match(formatPlan({ ...PLAN, device: "cpu" }).lines.join("\n"), /KV cache on cpu$/m); // not "on GPU"
  const missing = formatPlan({ ...PLAN, model: "release (Inf-DiT.safetensors not found in models/infdit)" });
  assert.match(missing.lines.at(-1), /released model: Inf-DiT\.safetensors not found in models\/infdit$/);
  assert.equal(formatPlan({ error: "no model" }).status, "error");
  assert.equal(formatPlan(null).status, "unknown");
});

test("planQuery encodes inputs and waits for a size", () => {
  assert.equal(planQuery({ model: "a b.safetensors", width: 0, height: 512 }), null);
  const q = planQuery({ model: "a b.safetensors", dtype: "bf16", width: 1024, height: 768, scale: "4",
    block_batch: "auto", offload_cache: "on" });
  const url = new URL(q, "http://x");
  assert.equal(url.pathname, "/uniba/infdit/plan");
  assert.equal(url.searchParams.get("model"), "a b.safetensors");
  assert.equal(url.searchParams.get("width"), "1024");
  assert.equal(url.searchParams.get("height"), "768");
  assert.equal(url.searchParams.get("offload_cache"), "on");
});

function fakeNode(type, widgets = {}, inputs = {}, size = null) {
  return { type, widget: (n) => widgets[n], input: (n) => inputs[n] ?? null, imageSize: () => size };
}

test("estimateImageSize walks the graph upstream", () => {
  const latent = fakeNode("SanaEmptyLatent", { width: 1024, height: 768 });
  const sampler = fakeNode("SanaSampler", {}, { latent_image: latent });
  const decode = fakeNode("SanaVAEDecode", {}, { samples: sampler });
  assert.deepEqual(estimateImageSize(decode), [1024, 768]);

  const sdxl = fakeNode("VAEDecode", {}, { samples: fakeNode("KSampler", {}, {
    latent_image: fakeNode("EmptyLatentImage", { width: 2048, height: 2048 }) }) });
  const scaled = fakeNode("ImageScaleBy", { scale_by: 0.5 }, { image: sdxl });
  assert.deepEqual(estimateImageSize(scaled), [1024, 1024]);
  const up = fakeNode("InfDiTUpscale", { scale: "2" }, { image: sdxl });
  assert.deepEqual(estimateImageSize(up), [4096, 4096]);

  assert.deepEqual(estimateImageSize(fakeNode("LoadImage", {}, {}, [640, 480])), [640, 480]);
  assert.equal(estimateImageSize(fakeNode("LoadImage")), null);
  assert.equal(estimateImageSize(fakeNode("SomethingElse")), null);
  assert.equal(estimateImageSize(null), null);
  assert.deepEqual(estimateImageSize(fakeNode("Reroute", {}, { "": latent })), [1024, 768]);
});

test("the planner's block_order and evaluations are used as sent, not re-derived", () => {
  // a deliberately unusual order (bottom row first) that the traversal rule would never produce
  const pass = { ...PASS_4X, grid_rows: 2, grid_cols: 3, block_batch: [1, 2], batches_per_step: 3,
    block_order: [[1, 0, 1, 2], [1, 2, 1, 1], [0, 0, 1, 3]] };
  const plan = { ...PLAN, passes: [pass], evaluations: 7 };
  assert.deepEqual(batchOrder(plan), [[[1, 0], [1, 1]], [[1, 2]], [[0, 0], [0, 1], [0, 2]]]);
  assert.equal(batchesPerStep(plan), 3);
  assert.equal(modelCalls(plan), 7);
  const state = progressState(plan, 1, 3 * 7);
  assert.deepEqual(state.done.map((row) => row.map(Number)), [[0, 0, 0], [1, 1, 0]]);
});

test("progress_state entries and subgraph node paths resolve to graph nodes", () => {
  const inner = { id: 5, getNodeById: () => null };
  const sub = { getNodeById: (id) => (id === 5 ? inner : null) };
  const outer = { id: 12, subgraph: sub };
  const top = { id: 3 };
  const graph = { getNodeById: (id) => ({ 12: outer, 3: top })[id] ?? null };
  assert.equal(resolveNode(graph, "3"), top);
  assert.equal(resolveNode(graph, 3), top);
  assert.equal(resolveNode(graph, "12:5"), inner);
  assert.equal(resolveNode(graph, "12:6"), null);
  assert.equal(resolveNode(graph, "3:1"), null); // not a subgraph node
  assert.equal(resolveNode(null, "3"), null);
  const detail = { prompt_id: "p", nodes: {
    "12:5": { value: 4, max: 10, state: "running", node_id: "12:5", display_node_id: "12:5", real_node_id: "5" },
    7: { value: 1, max: 1, state: "finished", node_id: "7" },
    bad: { value: "x", max: 2 },
  } };
  assert.deepEqual(progressEntries(detail).map((e) => [e.locator, e.value, e.max]), [["7", 1, 1], ["12:5", 4, 10]]);
  assert.deepEqual(progressEntries(undefined), []);
});

test("planQuery sends the steps and the wired sampler so the planner counts the model evaluations", () => {
  const url = new URL(planQuery({ width: 64, height: 64, scale: "2", steps: 3, sampler: "dpmpp_2m" }), "http://x");
  assert.equal(url.searchParams.get("steps"), "3");
  assert.equal(url.searchParams.get("sampler"), "dpmpp_2m");
  const bare = new URL(planQuery({ width: 64, height: 64 }), "http://x").searchParams;
  assert.equal(bare.get("steps"), null);
  assert.equal(bare.get("sampler"), null);
});

test("wiredSampling reads the sampler and the schedule's steps the node will use", () => {
  assert.deepEqual(wiredSampling(fakeNode("InfDiTUpscale", { steps: 20 })), { sampler: undefined, steps: 20 });
  const select = fakeNode("KSamplerSelect", { sampler_name: "euler_ancestral" });
  const karras = fakeNode("KarrasScheduler", { steps: 16, sigma_max: 40 });
  const wired = fakeNode("InfDiTUpscale", { steps: 20 }, { sampler: select, sigmas: karras });
  assert.deepEqual(wiredSampling(wired), { sampler: "euler_ancestral", steps: 16 });
  const sde = fakeNode("InfDiTUpscale", { steps: 12 }, { sampler: fakeNode("SamplerDPMPP_3M_SDE", { eta: 0 }) });
  assert.deepEqual(wiredSampling(sde), { sampler: "dpmpp_3m_sde", steps: 12 });
});
