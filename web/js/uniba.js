// UniBA frontend extension: a live Inf-DiT plan readout on InfDiTUpscale, and block progress.
// The arithmetic lives in uniba_logic.js (tested with Node); this file only talks to ComfyUI.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import {
  INFDIT_LOADER, INFDIT_UPSCALE, batchOrder, estimateImageSize, formatPlan, gridLayout, lastPass, planQuery,
  progressEntries, progressState, resolveNode, wiredSampling,
} from "./uniba_logic.js";

const EXTENSION = "uniba.InfDiT";
const WIDGET = "uniba_plan";
const POLL_MS = 800;
const ASSUMED_SIZE = [1024, 1024];

// Types for `tsc --checkJs` (tests/test_web_types.py) against @comfyorg/comfyui-frontend-types: the frontend does
// not export its node class by name, so it is taken from the extension hook that receives one.
/** @typedef {import("@comfyorg/comfyui-frontend-types").ComfyExtension} ComfyExtension */
/** @typedef {Parameters<NonNullable<ComfyExtension["nodeCreated"]>>[0]} LGraphNode */
/**
 * @typedef {object} Readout the plan readout's state on an InfDiTUpscale node
 * @property {HTMLDivElement} root
 * @property {HTMLPreElement} text
 * @property {HTMLCanvasElement} canvas
 * @property {unknown} widget
 * @property {any} plan the route's answer (uniba.infdit.plan.UpscalePlan.to_dict() + model, dtype, device) or {error}
 * @property {string | null | undefined} query
 * @property {boolean} [assumed]
 * @property {number} ticket
 * @property {ReturnType<typeof progressState> | null} progress
 */
/** @typedef {import("@comfyorg/comfyui-frontend-types").DOMWidgetOptions<any>} DOMWidgetOptions */
/** @typedef {import("@comfyorg/comfyui-frontend-types").DOMWidget<HTMLElement, any>} DOMWidget */
/**
 * What the app adds to every node at run time (not in the published LGraphNode type), and our readout state.
 * @typedef {object} AppNodeAdditions
 * @property {(name: string, type: string, element: HTMLElement, options?: DOMWidgetOptions) => DOMWidget} [addDOMWidget]
 * @property {HTMLImageElement[] | undefined} [imgs] the node's image previews (LoadImage)
 * @property {Readout} [__uniba]
 * @property {ReturnType<typeof setInterval>} [__unibaTimer]
 */
/** @typedef {LGraphNode & AppNodeAdditions} ReadoutNode */

/** Nodes that carry a readout (top level or inside subgraphs), for resetting them when a run starts. */
/** @type {Set<ReadoutNode>} */
const readouts = new Set();
/** Set once the server sends progress_state (node ids inside subgraphs); the legacy progress event is ignored then. */
let progressStateSeen = false;

/**
 * @param {LGraphNode | null | undefined} node
 * @param {string} name
 */
const widgetValue = (node, name) => node?.widgets?.find((w) => w.name === name)?.value;

/**
 * The node feeding a named input, through the public slot API (`input.link` is deprecated in newer frontends).
 * @param {LGraphNode} node
 * @param {string} name input name; "" = the first input
 * @returns {LGraphNode | null}
 */
function upstream(node, name) {
  const slot = name === "" ? 0 : (node.inputs ?? []).findIndex((i) => i.name === name);
  return slot >= 0 && node.isInputConnected(slot) ? node.getInputNode(slot) : null;
}

// The graph as the pure size estimator sees it: a node's type, widgets and upstream nodes.
/** @param {ReadoutNode} node */
function adapt(node) {
  if (!node) return null;
  return {
    type: node.comfyClass ?? node.type,
    widget: (name) => widgetValue(node, name),
    input: (name) => adapt(upstream(node, name)),
    imageSize: () => {
      const img = node.imgs?.[0];
      return img?.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;
    },
  };
}

/** @param {ReadoutNode} node */
function currentQuery(node) {
  const known = estimateImageSize(adapt(upstream(node, "image")));
  const [width, height] = known ?? ASSUMED_SIZE;
  const loader = upstream(node, "model");
  const fromLoader = (loader?.comfyClass ?? loader?.type) === INFDIT_LOADER;
  const { sampler, steps } = wiredSampling(adapt(node));
  return {
    assumed: !known,
    query: planQuery({
      model: fromLoader ? widgetValue(loader, "model_name") : undefined,
      dtype: fromLoader ? widgetValue(loader, "dtype") : undefined,
      width, height,
      scale: widgetValue(node, "scale"),
      steps,
      sampler,
      block_batch: widgetValue(node, "block_batch"),
      offload_cache: widgetValue(node, "offload_cache"),
    }),
  };
}

/** @param {ReadoutNode} node */
function draw(node) {
  const state = node.__uniba;
  if (!state) return;
  const { plan, assumed, progress } = state;
  const view = formatPlan(plan);
  const lines = [...view.lines];
  if (plan && !plan.error && assumed) lines.push(`(input size unknown until run: assuming ${ASSUMED_SIZE.join("×")})`);
  if (progress) {
    lines.push(`Running: pass ${progress.pass}/${progress.passes}, model call ${progress.call}/${progress.calls}, ` +
      `${progress.doneBatches}/${progress.batches} block batches`);
  }
  state.text.textContent = lines.join("\n");
  state.root.dataset.status = view.status;
  state.text.style.color = view.status === "fits" ? "#9be39b" : view.status === "unknown" ? "#bbb" : "#ff9c8a";

  const canvas = state.canvas;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!plan || plan.error) return;
  const { grid_rows: rows, grid_cols: cols } = lastPass(plan);
  const grid = gridLayout(plan, canvas.width, canvas.height, rows * cols > 400 ? 0 : 1);
  const order = batchOrder(plan);
  const current = progress && progress.doneBatches < order.length ? order[progress.doneBatches] : [];
  const isCurrent = new Set(current.map(([r, c]) => `${r},${c}`));
  const firstBatch = new Set((order[0] ?? []).map(([r, c]) => `${r},${c}`));
  for (const cell of grid.cells) {
    const key = `${cell.row},${cell.col}`;
    let color = "#3a3f47";
    if (progress?.done[cell.row][cell.col]) color = "#4caf50";
    else if (progress && isCurrent.has(key)) color = "#e0b020";
    else if (!progress && firstBatch.has(key)) color = "#5a6b85"; // shows the block batch size at rest
    ctx.fillStyle = color;
    ctx.fillRect(cell.x, cell.y, cell.w, cell.h);
  }
}

/**
 * @param {ReadoutNode} node
 * @param {boolean} [force]
 */
async function refresh(node, force = false) {
  const state = node.__uniba;
  if (!state) return;
  const { query, assumed } = currentQuery(node);
  if (!force && query === state.query) return;
  state.query = query;
  state.assumed = assumed;
  if (!query) {
    state.plan = null;
    draw(node);
    return;
  }
  const ticket = ++state.ticket;
  try {
    const resp = await api.fetchApi(query, { cache: "no-store" });
    const body = await resp.json();
    if (ticket !== state.ticket) return; // a newer request superseded this one
    state.plan = resp.ok ? body : { error: body?.error ?? `HTTP ${resp.status}` };
  } catch (err) {
    if (ticket !== state.ticket) return;
    state.plan = { error: `plan route unreachable (${err?.message ?? err})` };
  }
  draw(node);
  node.setDirtyCanvas?.(true, false);
}

/** @param {ReadoutNode} node */
function attachReadout(node) {
  const root = document.createElement("div");
  root.className = "uniba-plan";
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;font:11px monospace;padding:2px 4px;" +
    "box-sizing:border-box;overflow:hidden;";
  const text = document.createElement("pre");
  text.className = "uniba-plan-text";
  text.style.cssText = "margin:0;white-space:pre-wrap;line-height:1.3;";
  const canvas = document.createElement("canvas");
  canvas.className = "uniba-plan-grid";
  canvas.width = 240;
  canvas.height = 120;
  canvas.style.cssText = "width:240px;height:120px;align-self:center;";
  root.append(text, canvas);

  const widget = node.addDOMWidget(WIDGET, "uniba_plan", root, { serialize: false, hideOnZoom: false });
  widget.serialize = false;
  widget.computeLayoutSize = () => ({ minHeight: 230, minWidth: 300 });
  node.__uniba = { root, text, canvas, widget, plan: null, query: undefined, ticket: 0, progress: null };
  readouts.add(node);
  draw(node);
  refresh(node, true);
  node.__unibaTimer = setInterval(() => {
    if (!node.graph) return;
    refresh(node);
  }, POLL_MS);
}

/**
 * @param {string | number} locator
 * @param {number} value
 * @param {number} max
 */
function showProgress(locator, value, max) {
  /** @type {ReadoutNode | null} */
  const node = resolveNode(app.graph, locator);
  if (!node?.__uniba?.plan || node.__uniba.plan.error) return;
  node.__uniba.progress = progressState(node.__uniba.plan, value, max);
  draw(node);
}

/** Legacy per-node progress: top-level node ids only; superseded by progress_state where the server sends it. */
/** @param {CustomEvent} event */
function onProgress(event) {
  if (progressStateSeen) return;
  const { value, max, node } = event.detail ?? {};
  showProgress(node, value, max);
}

/** progress_state: every running node, including nodes inside subgraphs ("12:5"). */
/** @param {CustomEvent} event */
function onProgressState(event) {
  progressStateSeen = true;
  for (const { locator, value, max } of progressEntries(event.detail)) showProgress(locator, value, max);
}

function onExecutionStart() {
  for (const node of readouts) {
    node.__uniba.progress = null;
    draw(node);
  }
}

app.registerExtension({
  name: EXTENSION,
  async setup() {
    api.addEventListener("progress", onProgress);
    api.addEventListener("progress_state", onProgressState);
    api.addEventListener("execution_start", onExecutionStart);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== INFDIT_UPSCALE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      attachReadout(this);
      return result;
    };
    const onWidgetChanged = nodeType.prototype.onWidgetChanged;
    nodeType.prototype.onWidgetChanged = function () {
      const result = onWidgetChanged?.apply(this, arguments);
      refresh(this);
      return result;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const result = onConnectionsChange?.apply(this, arguments);
      const node = /** @type {ReadoutNode} */ (this);
      if (node.__uniba) refresh(node);
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      const node = /** @type {ReadoutNode} */ (this);
      clearInterval(node.__unibaTimer);
      readouts.delete(node);
      return onRemoved?.apply(this, arguments);
    };
  },
});
