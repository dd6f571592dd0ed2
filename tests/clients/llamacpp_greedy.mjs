// Run a GGUF file in llama.cpp (through node-llama-cpp's prebuilt CPU binaries) and print, as one
// JSON line, the greedy continuation of a prompt given as token ids, and llama.cpp's own
// tokenization of a text. Used by tests/test_gguf.py; nothing is downloaded or built here.
//   node llamacpp_greedy.mjs NODE_MODULES MODEL.gguf IDS(comma-separated) N TEXT
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const [nodeModules, modelPath, prompt, n, text] = process.argv.slice(2);
const {getLlama, LlamaLogLevel} = await import(
    pathToFileURL(join(nodeModules, "node-llama-cpp", "dist", "index.js")).href);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 256, threads: 1});
const sequence = context.getSequence();
const tokens = [];
// temperature 0: argmax at every step, the same rule as rwkvtune's greedy decoding
for await (const token of sequence.evaluate(prompt.split(",").map(Number), {temperature: 0})) {
    tokens.push(token);
    if (tokens.length >= Number(n)) break;
}
console.log(JSON.stringify({tokens, tokenized: model.tokenize(text)}));
await context.dispose();
await model.dispose();
await llama.dispose();
