// ComfyUI frontend extension "astria.preview": a live preview under Astria Prompt's text box.
// The parsing is the Python parser's, through POST /astria/parse, so the preview and the run never disagree.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ensureStyle, renderFailure, renderReport } from "./astria.render.js";

const NODE_ID = "AstriaPrompt";
const TEXT_WIDGET = "text";
const DEBOUNCE_MS = 300; // one request per pause in typing, not per key
const POLL_MS = 1000; // catches value changes that fire no event (workflow load, undo, other extensions)
const PREVIEW_MIN_HEIGHT = 90;

/** Ask the server to parse `text`; resolves to the report, or throws with a sentence for the preview. */
async function fetchReport(text, signal) {
  const response = await api.fetchApi("/astria/parse", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text }),
    signal,
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    throw new Error(`the server answered ${response.status} without JSON: is ComfyUI-Astria loaded?`);
  }
  if (!response.ok && !(body && body.error)) throw new Error(`the server answered ${response.status}`);
  return body;
}

/** The text box of a text widget: `element` where the frontend has it (newer ones deprecate `inputEl`), else
 *  `inputEl`. Checked with `in`, so the deprecated getter is never read where the new name exists. */
function textInputElement(widget) {
  return "element" in widget ? widget.element : widget.inputEl;
}

/** Attach the preview to one Astria Prompt node: a DOM widget below the text, refreshed after typing pauses. */
function attachPreview(node) {
  const textWidget = node.widgets?.find((widget) => widget.name === TEXT_WIDGET);
  if (!textWidget || node.astriaPreview) return;
  ensureStyle();
  const container = document.createElement("div");
  container.className = "astria-preview";
  container.dataset.state = "pending";
  const widget = node.addDOMWidget("astria_preview", "astria.preview", container, {
    serialize: false, // the preview is derived from the text: never part of the workflow or the prompt
    getMinHeight: () => PREVIEW_MIN_HEIGHT,
    hideOnZoom: false,
    // Newer frontends list a selected node's widgets in the right-side panel (Parameters): the preview is not a
    // parameter, and drawing it there would also resize the canvas copy to the panel's width.
    hideInPanel: true,
  });
  widget.serialize = false;

  const state = { lastText: null, timer: null, controller: null, poll: null };
  node.astriaPreview = state;

  const refresh = async () => {
    state.timer = null;
    const text = String(textWidget.value ?? "");
    state.lastText = text;
    state.controller?.abort();
    const controller = new AbortController();
    state.controller = controller;
    container.dataset.state = "pending";
    try {
      const report = await fetchReport(text, controller.signal);
      if (controller.signal.aborted || state.lastText !== text) return; // a newer text is on its way
      renderReport(container, report, text);
    } catch (error) {
      if (controller.signal.aborted) return;
      renderFailure(container, error.message || String(error));
    }
  };
  const schedule = () => {
    clearTimeout(state.timer);
    state.timer = setTimeout(refresh, DEBOUNCE_MS);
  };

  textInputElement(textWidget)?.addEventListener("input", schedule);
  const originalCallback = textWidget.callback;
  textWidget.callback = function (...args) {
    schedule();
    return originalCallback?.apply(this, args);
  };
  state.poll = setInterval(() => {
    if (state.timer === null && String(textWidget.value ?? "") !== state.lastText) schedule();
  }, POLL_MS);
  schedule();

  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    clearTimeout(state.timer);
    clearInterval(state.poll);
    state.controller?.abort();
    return onRemoved?.apply(this, args);
  };
}

app.registerExtension({
  name: "astria.preview",
  async nodeCreated(node) {
    if (node.comfyClass === NODE_ID || node.type === NODE_ID) attachPreview(node);
  },
});
