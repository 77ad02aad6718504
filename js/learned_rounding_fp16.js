// ComfyUI front-end extension: draws the conversion report on LearnedRoundingFP16 nodes,
// live while the conversion runs (layer events) and in full once it has run (the node's "ui" output).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { emptyState, finalState, mergeLayerEvent, reportHtml, PLOT } from "./report_view.js";

const NODE_NAME = "LearnedRoundingFP16";
const LAYER_EVENT = "learned_rounding_fp16.layer";

function render(node) {
  node.lrfp16.element.innerHTML = reportHtml(node.lrfp16.state);
  node.setDirtyCanvas?.(true, false);
}

app.registerExtension({
  name: "learned_rounding_fp16.report",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_NAME) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const element = document.createElement("div");
      element.style.cssText = "font: 11px sans-serif; color: var(--input-text, #ddd); overflow: hidden;";
      this.lrfp16 = { element, state: emptyState() };
      this.addDOMWidget("report", "lrfp16_report", element, { serialize: false, getMinHeight: () => PLOT.height + 48 });
      render(this);
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const report = output?.quant_report?.[0];
      if (report && this.lrfp16) {
        this.lrfp16.state = finalState(report);
        render(this);
      }
    };
  },

  setup() {
    api.addEventListener(LAYER_EVENT, ({ detail }) => {
      const node = app.graph?.getNodeById(detail.node);
      if (!node?.lrfp16) return;
      node.lrfp16.state = mergeLayerEvent(node.lrfp16.state, detail);
      render(node);
    });
  },
});
