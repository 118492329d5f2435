// Validate Prometheus Operator objects with the operator's published models
// (@kubernetes-models/prometheus-operator: ajv validators generated from its CRDs).
//
// Usage: node crd_validate.mjs INSTALL_DIR < objects.json
//   INSTALL_DIR: where `npm install --prefix` put the models (.cache/deploy-check).
//   stdin: a JSON array of objects; stdout: a JSON array of {index, error}, one per object
//   that fails (an object of a kind not listed below is an error too, not a pass).
// The models are ES modules, which ignore NODE_PATH, so each is imported by its file URL;
// its own imports then resolve inside INSTALL_DIR/node_modules.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const KINDS = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];
const root = process.argv[2];
if (!root) {
  process.stderr.write("usage: node crd_validate.mjs INSTALL_DIR < objects.json\n");
  process.exit(2);
}
const models = {};
for (const kind of KINDS) {
  const file = join(root, "node_modules", "@kubernetes-models", "prometheus-operator",
    "monitoring.coreos.com", "v1", `${kind}.js`);
  models[kind] = (await import(pathToFileURL(file).href))[kind];
}
const objects = JSON.parse(readFileSync(0, "utf8"));
const problems = [];
objects.forEach((obj, index) => {
  const model = models[obj.kind];
  if (obj.apiVersion !== "monitoring.coreos.com/v1" || !model) {
    problems.push({ index, error: `no model for ${obj.apiVersion} ${obj.kind}` });
    return;
  }
  try {
    new model(obj).validate();
  } catch (err) {
    problems.push({ index, error: String(err.message ?? err) });
  }
});
process.stdout.write(JSON.stringify(problems));
