// transformers.js as a validation runner: loads an ONNX bundle folder as a Hugging Face model repository
// (AutoModelForCausalLM.from_pretrained, local files only) and answers one JSON request per stdin line:
//   {"op": "prefill", "ids": [...]}          → the last position's logits (a new sequence)
//   {"op": "decode", "token": 7}             → the next logits, after the cached sequence
//   {"op": "prefill_every_position", "ids": [...], "path": p} → every position's logits, written to the file p
//                                              as float32 (too large for a line); answers {"positions": n}
//   {"op": "generate", "ids": [...], "max_new_tokens": n}  → transformers.js' own greedy generate() tokens
// Each answer is one stdout line starting with RESULT_MARK: JSON, with logits as base64 float32. Anything else
// the library prints goes to stderr.
// Usage: node transformers_js_runner.mjs <bundle folder> <dtype> <folder holding node_modules/@huggingface/transformers>
import { writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';
import { pathToFileURL } from 'node:url';

const RESULT_MARK = '@@result ';
const [folder, dtype, packages] = process.argv.slice(2);
const entry = createRequire(path.join(path.resolve(packages), 'package.json')).resolve('@huggingface/transformers');
const { AutoModelForCausalLM, Tensor, env } = await import(pathToFileURL(entry).href);

// The library's own messages must not mix with the answers on stdout.
console.log = console.info = console.warn = (...args) => process.stderr.write(args.join(' ') + '\n');
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder)) + path.sep;
const model = await AutoModelForCausalLM.from_pretrained(path.basename(path.resolve(folder)),
    { dtype, device: 'cpu', local_files_only: true });

let cache = null;
let mask = [];

function int64(values) {
    return new Tensor('int64', BigInt64Array.from(values.map(BigInt)), [1, values.length]);
}

async function step(ids, everyPositionPath = null) {
    mask = mask.concat(ids.map(() => 1));
    const outputs = await model({ input_ids: int64(ids), attention_mask: int64(mask), past_key_values: cache });
    const next = {};
    for (const [name, tensor] of Object.entries(outputs)) {
        if (name.startsWith('present.')) next[name.replace('present.', 'past_key_values.')] = tensor;
    }
    cache = next;
    const { data, dims } = outputs.logits;
    const vocab = dims.at(-1);
    if (everyPositionPath) {
        const every = data instanceof Float32Array ? data : Float32Array.from(data);
        await writeFile(everyPositionPath, Buffer.from(every.buffer, every.byteOffset, every.byteLength));
        return { positions: every.length / vocab };
    }
    const last = Float32Array.from(data.subarray(data.length - vocab));
    return { logits: Buffer.from(last.buffer).toString('base64') };
}

async function answer(request) {
    if (request.op === 'prefill') {
        cache = null;
        mask = [];
        return step(request.ids);
    }
    if (request.op === 'decode') return step([request.token]);
    if (request.op === 'prefill_every_position') {
        cache = null;
        mask = [];
        return step(request.ids, request.path);
    }
    if (request.op === 'generate') {
        const input_ids = int64(request.ids);
        const output = await model.generate({
            input_ids, attention_mask: int64(request.ids.map(() => 1)), max_new_tokens: request.max_new_tokens,
            min_new_tokens: request.max_new_tokens, do_sample: false,
        });
        return { tokens: Array.from(output.data.slice(request.ids.length), Number) };
    }
    throw new Error(`unknown op ${request.op}`);
}

process.stdout.write(RESULT_MARK + JSON.stringify({ ready: true }) + '\n');
for await (const line of readline.createInterface({ input: process.stdin })) {
    let reply;
    try {
        reply = await answer(JSON.parse(line));
    } catch (error) {
        reply = { error: String(error && error.message || error).split('\n')[0] };
    }
    process.stdout.write(RESULT_MARK + JSON.stringify(reply) + '\n');
}
