// UniBA warnings in the browser: the server sends "uniba.warning" (nodes/comfy/host.py warn()) when a node's result
// differs from what was asked (a size rounded to the model's grid, a schedule that leaves noise); shown as a toast.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "uniba.warning";

app.registerExtension({
  name: "uniba.Warnings",
  setup() {
    // a pack's own server event: not among the frontend's typed ones
    /** @type {any} */ (api).addEventListener(EVENT, (/** @type {any} */ event) => {
      const message = String(event?.detail?.message ?? "");
      /** @type {any} */
      const manager = app.extensionManager;
      if (manager?.toast?.add) {
        manager.toast.add({ severity: "warn", summary: "UniBA", detail: message, life: 20000 });
      } else {
        console.warn(`UniBA: ${message}`);
      }
    });
  },
});
