// Parse Flux queries with InfluxData's own parser, the npm package @influxdata/flux (the Rust parser of
// InfluxDB 2.x built to WebAssembly), installed next to this file by scripts/install-test-tools.sh.
//
//   node tests/flux/parse.mjs < queries.json     # a JSON list of query strings
//
// Prints a JSON list with one list of error messages per query (empty: it parses). Used by
// tests/test_dashboards.py. The package is a wasm-bindgen build for bundlers: flux.js imports
// './flux_bg.wasm' as an ES module, which Node does not do without a flag, so this script instantiates the
// .wasm itself and hands it to flux.js (loaded with that one import line replaced). Nothing else is changed.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "node_modules", "@influxdata", "flux");
const glueSource = readFileSync(join(pkg, "flux.js"), "utf8");
const wasmImport = "import * as wasm from './flux_bg.wasm';";
if (!glueSource.includes(wasmImport)) {
  throw new Error(`${join(pkg, "flux.js")}: no "${wasmImport}" line (a different build of @influxdata/flux?)`);
}
const glue = await import("data:text/javascript," +
  encodeURIComponent(glueSource.replace(wasmImport, "let wasm; export function __bindWasm(e) { wasm = e; }")));
const { instance } = await WebAssembly.instantiate(readFileSync(join(pkg, "flux_bg.wasm")), { "./flux.js": glue });
glue.__bindWasm(instance.exports);

// The parser always returns an AST; what it could not parse is marked in it: an `errors` list on a node,
// or a BadStatement / BadExpression node.
function errors(node, found = []) {
  if (Array.isArray(node)) {
    node.forEach((child) => errors(child, found));
  } else if (node && typeof node === "object") {
    const where = node.location ? ` at line ${node.location.start.line}, column ${node.location.start.column}` : "";
    for (const e of node.errors || []) found.push(`${e.msg}${where}`);
    if (node.type === "BadStatement" || node.type === "BadExpression") found.push(`${node.type}: ${node.text}${where}`);
    Object.values(node).forEach((child) => errors(child, found));
  }
  return found;
}

const queries = JSON.parse(readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(queries.map((query) => errors(glue.parse(query)))) + "\n");
