// Pure logic of the UniBA frontend extension: no DOM, no ComfyUI imports, so Node's test runner
// can check it (tests/web/*.test.mjs). The extension (uniba.js) only wires it to the canvas.

export const PLAN_ROUTE = "/uniba/infdit/plan";
export const INFDIT_UPSCALE = "InfDiTUpscale";
export const INFDIT_LOADER = "InfDiTLoader";

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** Human-readable byte count: 1536 -> "1.5 KiB", 12.3e9 -> "11.5 GiB". */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined || !Number.isFinite(Number(bytes))) return "?";
  let value = Number(bytes);
  const sign = value < 0 ? "-" : "";
  value = Math.abs(value);
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 ? 0 : value >= 100 ? 0 : 1;
  return `${sign}${value.toFixed(digits)} ${UNITS[unit]}`;
}

/** The planner's traversal ("row-major" / "column-major", uniba.infdit.blockwise) as the axis it walks. */
export function traversalAxis(traversal) {
  return traversal === "column-major" ? "columns" : "rows";
}

/**
 * The last pass of a plan (the largest canvas, the one the readout draws). The route sends the JSON of
 * uniba.infdit.plan.UpscalePlan: run-wide facts at the top, everything per pass in `passes[i]`.
 */
export function lastPass(plan) {
  return plan.passes[plan.passes.length - 1];
}

/** The last pass's block batch as [n_h, n_w]. */
export function blockBatchShape(plan) {
  const [nh, nw] = lastPass(plan).block_batch;
  return [nh, nw];
}

/** Number of block batches one model call of the last pass runs (ragged edges included). */
export function batchesPerStep(plan) {
  return lastPass(plan).batches_per_step;
}

/**
 * The block batches of one model call of the last pass in the order the engine runs them, as the planner sends
 * them (`block_order`: [row, col, rows, cols] rectangles in run order); each entry lists its [row, col] blocks.
 */
export function batchOrder(plan) {
  return lastPass(plan).block_order.map(([row, col, rows, cols]) => {
    const blocks = [];
    for (let r = row; r < row + rows; r++) {
      for (let c = col; c < col + cols; c++) blocks.push([r, c]);
    }
    return blocks;
  });
}

/** Number of passes. */
export function passCount(plan) {
  return plan.passes.length;
}

/** Model calls per pass, as the planner counted them for the wired sampler and schedule. */
export function modelCalls(plan) {
  return plan.evaluations;
}

/** Block batches per model call of every pass. */
export function batchesPerPass(plan) {
  return plan.passes.map((p) => p.batches_per_step);
}

/**
 * Where a run is, from ComfyUI's progress event (value of max) and the plan.
 *
 * The Inf-DiT node ticks once per block batch per model call, over all passes. The fraction value/max
 * is mapped onto that schedule, so the grid is exact for those ticks and still sensible for coarser
 * ones (images in a batch, a node that ticks per step). The grid shows the last pass.
 * Returns {pass, passes, call, calls, doneBatches, batches, done: boolean[rows][cols], fraction}.
 */
export function progressState(plan, value, max) {
  const perPass = batchesPerPass(plan);
  const passes = perPass.length;
  const calls = modelCalls(plan);
  const units = perPass.map((b) => b * calls);
  const total = units.reduce((a, b) => a + b, 0);
  const fraction = max > 0 ? Math.min(1, Math.max(0, value / max)) : 0;
  let left = Math.min(total, Math.round(fraction * total));
  let pass = 0;
  while (pass < passes - 1 && left >= units[pass]) {
    left -= units[pass];
    pass += 1;
  }
  const batches = perPass[pass];
  const finished = left >= units[pass];
  const call = finished ? calls : Math.floor(left / batches) + 1;
  const doneBatches = finished ? batches : left % batches;
  const { grid_rows: rows, grid_cols: cols } = lastPass(plan);
  const done = Array.from({ length: rows }, () => new Array(cols).fill(false));
  if (pass === passes - 1) {
    batchOrder(plan).slice(0, doneBatches).forEach((blocks) => {
      for (const [r, c] of blocks) done[r][c] = true;
    });
  }
  return { pass: pass + 1, passes, call, calls, doneBatches, batches, done, fraction };
}

/**
 * Cell rectangles for drawing the block grid inside a box, keeping the image's aspect ratio.
 * Returns {x, y, width, height, cell, cells: [{row, col, x, y, w, h}]} in box coordinates.
 */
export function gridLayout(plan, boxWidth, boxHeight, gap = 1) {
  const rows = Math.max(1, lastPass(plan).grid_rows | 0);
  const cols = Math.max(1, lastPass(plan).grid_cols | 0);
  const cell = Math.max(1, Math.floor(Math.min(boxWidth / cols, boxHeight / rows)));
  const width = cell * cols;
  const height = cell * rows;
  const x = Math.floor((boxWidth - width) / 2);
  const y = Math.floor((boxHeight - height) / 2);
  const inner = Math.max(1, cell - gap);
  const cells = [];
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) cells.push({ row: r, col: c, x: x + c * cell, y: y + r * cell, w: inner, h: inner });
  }
  return { x, y, width, height, cell, cells };
}

/** The verdict line. When the free figure was taken with the weights already loaded, the peak counts
 *  weights that are not part of "free", so a peak above it can still fit: say so instead of a bare "fits". */
function fitLine(plan) {
  const free = formatBytes(plan.free_bytes);
  if (!plan.fits) return `Does not fit: ${free} free — lower block_batch or turn offload_cache on`;
  if (plan.weights_resident && plan.peak_bytes > plan.free_bytes) {
    const work = formatBytes(Math.max(0, plan.peak_bytes - plan.weights_bytes));
    return `Fits: the work (${work}) fits in ${free} free; the weights are already loaded`;
  }
  return `Fits: ${free} free`;
}

/** The lines of the plan readout shown under InfDiTUpscale's widgets. */
export function formatPlan(plan) {
  if (!plan) return { lines: ["Inf-DiT plan: waiting for the input size"], fits: null, status: "unknown" };
  if (plan.error) return { lines: [`Inf-DiT plan: ${plan.error}`], fits: false, status: "error" };
  const last = lastPass(plan);
  const [nh, nw] = blockBatchShape(plan);
  const walk = traversalAxis(last.traversal) === "columns" ? "column" : "row";
  const passes = passCount(plan);
  const chain = ` (${plan.passes.map((p) => `${p.scale}x`).join(" + ")})`;
  const where = last.offload_cache ? "offloaded to host RAM" : `on ${String(plan.device ?? "the device").split(":")[0]}`;
  const lines = [
    `Output ${last.out_width}×${last.out_height} px, ${passes} pass${passes === 1 ? "" : "es"}${chain}`,
    `Blocks ${last.grid_cols}×${last.grid_rows} of ${plan.block_px} px, ${walk} by ${walk}`,
    `Block batch ${nw}×${nh} (${batchesPerStep(plan)} per model call, ${plan.evaluations} model calls), KV cache ${where}`,
    `Peak ≈ ${formatBytes(plan.peak_bytes)} (weights ${formatBytes(plan.weights_bytes)}, cache ${formatBytes(last.cache_bytes)})`,
    fitLine(plan),
  ];
  if (plan.rope_wraps) lines.push("Beyond the trained size: positions wrap, expect repeated structure");
  if (typeof plan.model === "string" && plan.model.startsWith("release (")) {
    lines.push(`Planned for the released model: ${plan.model.slice(9, -1)}`);
  }
  return { lines, fits: Boolean(plan.fits), status: plan.fits ? "fits" : "too-big" };
}

/** The route's query string for a set of inputs; null while the input size is unknown. */
export function planQuery({ model, dtype, width, height, scale, steps, sampler, block_batch, offload_cache }) {
  if (!(width > 0 && height > 0)) return null;
  const params = new URLSearchParams();
  if (model) params.set("model", model);
  if (dtype) params.set("dtype", dtype);
  params.set("width", String(Math.round(width)));
  params.set("height", String(Math.round(height)));
  params.set("scale", String(scale ?? "4"));
  if (Number.isFinite(Number(steps)) && Number(steps) > 0) params.set("steps", String(Number(steps)));
  if (sampler) params.set("sampler", String(sampler));
  params.set("block_batch", String(block_batch ?? "auto"));
  params.set("offload_cache", String(offload_cache ?? "auto"));
  return `${PLAN_ROUTE}?${params.toString()}`;
}

const num = (v) => (v === undefined || v === null || v === "" ? NaN : Number(v));

/**
 * Estimate the pixel size [width, height] of the IMAGE arriving at a node input, by walking the
 * graph upstream. `node` is an adapter: {type, widget(name) -> value, input(name) -> adapter|null,
 * imageSize() -> [w, h]|null}. Returns null when the size cannot be known before running.
 */
export function estimateImageSize(node, depth = 0) {
  if (!node || depth > 32) return null;
  const up = (name) => estimateImageSize(node.input(name), depth + 1);
  const widthHeight = () => {
    const w = num(node.widget("width"));
    const h = num(node.widget("height"));
    return w > 0 && h > 0 ? [w, h] : null;
  };
  switch (node.type) {
    case "LoadImage":
    case "LoadImageMask":
      return node.imageSize?.() ?? null;
    case "EmptyImage":
    case "EmptyLatentImage":
    case "EmptySD3LatentImage":
    case "SanaEmptyLatent":
    case "ImageScale":
    case "LatentUpscale":
      return widthHeight();
    case "ImageScaleBy":
    case "LatentUpscaleBy": {
      const s = up(node.type === "ImageScaleBy" ? "image" : "samples");
      const f = num(node.widget("scale_by"));
      return s && f > 0 ? [Math.round(s[0] * f), Math.round(s[1] * f)] : null;
    }
    case "InfDiTUpscale": {
      const s = up("image");
      const f = num(node.widget("scale"));
      return s && f > 0 ? [s[0] * f, s[1] * f] : null;
    }
    case "VAEDecode":
    case "VAEDecodeTiled":
    case "SanaVAEDecode":
    case "VAEEncode":
    case "SanaVAEEncode":
      return up(node.type.endsWith("Encode") ? "pixels" : "samples") ?? up("image");
    case "KSampler":
    case "KSamplerAdvanced":
    case "SanaSampler":
      return up("latent_image");
    case "SamplerCustom":
    case "SamplerCustomAdvanced":
      return up("latent_image") ?? up("latent");
    case "Reroute":
      return up("");
    default:
      return null;
  }
}

// ComfyUI's one-sampler nodes and the KSamplerSelect name of the sampler each makes.
const SAMPLER_NODES = {
  SamplerEulerAncestral: "euler_ancestral", SamplerEulerAncestralCFGPP: "euler_ancestral_cfg_pp",
  SamplerLMS: "lms", SamplerDPMPP_2M_SDE: "dpmpp_2m_sde", SamplerDPMPP_3M_SDE: "dpmpp_3m_sde",
  SamplerDPMPP_SDE: "dpmpp_sde", SamplerDPMPP_2S_Ancestral: "dpmpp_2s_ancestral",
};

/**
 * What the InfDiTUpscale node will sample with, read from the graph the way the node reads its inputs: the
 * `sampler` input's sampler name (KSamplerSelect or a one-sampler node; none: the reference's Heun) and the
 * steps of the `sigmas` input's scheduler (its `steps` widget; none wired: the node's own `steps`). `node` is an
 * adapter as for estimateImageSize. Returns {sampler, steps}; the route counts the model calls from them.
 */
export function wiredSampling(node) {
  const samplerNode = node.input("sampler");
  const sigmasNode = node.input("sigmas");
  let sampler;
  if (samplerNode) sampler = samplerNode.widget("sampler_name") ?? SAMPLER_NODES[samplerNode.type];
  const steps = sigmasNode ? sigmasNode.widget("steps") : node.widget("steps");
  return { sampler, steps };
}

/** A short key of everything the plan depends on, to refetch only when it changes. */
export function planKey(query) {
  return query ?? "";
}

/**
 * The graph node a progress message is about. `progress_state` names nodes inside subgraphs by their path of
 * node ids ("12:5": node 5 inside the subgraph of node 12); plain ids are top-level nodes. `graph` is anything
 * with getNodeById(id); a subgraph node exposes its inner graph as `.subgraph`.
 */
export function resolveNode(graph, locator) {
  if (!graph || locator === undefined || locator === null) return null;
  let node = null;
  let current = graph;
  for (const part of String(locator).split(":")) {
    if (!current?.getNodeById) return null;
    node = current.getNodeById(Number(part)) ?? current.getNodeById(part) ?? null;
    if (!node) return null;
    current = node.subgraph;
  }
  return node;
}

/**
 * The per-node progress entries of a `progress_state` message, as {locator, value, max}: `display_node_id` is
 * the node the user sees (a node inside a subgraph), falling back to `node_id`.
 */
export function progressEntries(detail) {
  const nodes = detail?.nodes ?? {};
  return Object.entries(nodes).map(([key, entry]) => ({
    locator: entry?.display_node_id ?? entry?.node_id ?? key,
    value: Number(entry?.value),
    max: Number(entry?.max),
    state: entry?.state,
  })).filter((e) => Number.isFinite(e.value) && Number.isFinite(e.max));
}
