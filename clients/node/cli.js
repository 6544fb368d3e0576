#!/usr/bin/env node
'use strict';
// Command-line demo of the Node.js client: every command prints JSON on stdout, so scripts (and tests) can read it.

const { parseArgs } = require('node:util');
const { connect, unary, embedStream, generate, decodeError, grpc } = require('./tandem');

const USAGE = `usage: node cli.js [--target HOST:PORT] [--model NAME] [--top-k N] [generation options] COMMAND [TEXT...]

  embed TEXT...     Embed; prints the EmbedResponse as JSON (embeddings[i].values is the vector of TEXT i)
  classify TEXT...  Classify with --model; prints the ClassifyResponse as JSON
  stream TEXT...    EmbedStream, one request per TEXT with ids r0, r1, ...; prints one JSON line per response
  generate PROMPT   Generate with --model (a text-generation model); prints each delta as it arrives, one JSON
                    line {"text", "token_ids"} each, then {"finish_reason" (stop, length or stop_sequence),
                    "stop_sequence", "usage", "model", "model_version"}. Options: --max-new-tokens N,
                    --temperature T, --seed N, --stop S (repeatable), --chat (send PROMPT as one user message)
  errors            provokes INVALID_ARGUMENT (no inputs), NOT_FOUND (unknown model) and a failed request inside
                    a stream; prints the code, message and decoded google.rpc details of each, one JSON line each

--target defaults to 127.0.0.1:50051; --model to the server's default model.`;

const GENERATE_TIMEOUT_MS = 120_000; // a whole generation, however many tokens it takes
const print = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

async function main() {
  const { values: options, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      model: { type: 'string', default: '' },
      'top-k': { type: 'string', default: '0' },
      'max-new-tokens': { type: 'string' },
      temperature: { type: 'string' },
      seed: { type: 'string' },
      stop: { type: 'string', multiple: true, default: [] },
      chat: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const [command, ...texts] = positionals;
  if (options.help || !command) {
    console.log(USAGE);
    return options.help ? 0 : 2;
  }
  const client = connect(options.target);
  const model = options.model;
  try {
    switch (command) {
      case 'embed':
        print(await unary(client, 'Embed', { model, inputs: texts }));
        return 0;
      case 'classify':
        print(await unary(client, 'Classify', { model, inputs: texts, top_k: Number(options['top-k']) }));
        return 0;
      case 'stream': {
        const requests = texts.map((text, i) => ({ id: `r${i}`, request: { model, inputs: [text] } }));
        for await (const response of embedStream(client, requests)) print(response);
        return 0;
      }
      case 'generate': {
        if (texts.length !== 1) {
          console.error(`generate takes one PROMPT (quote it)\n\n${USAGE}`);
          return 2;
        }
        // --chat: the prompt as one user message, rendered with the model's chat template on the server
        const input = options.chat ? { messages: [{ role: 'user', content: texts[0] }] } : { prompt: texts[0] };
        await showGeneration(client, { model, ...input, params: generationParams(options) });
        return 0;
      }
      case 'errors':
        await showErrors(client, model);
        return 0;
      default:
        console.error(`unknown command ${JSON.stringify(command)}\n\n${USAGE}`);
        return 2;
    }
  } catch (err) {
    if (err.code === undefined) throw err; // not a gRPC error: a bug, let it crash with its stack
    console.error(JSON.stringify(decodeError(err)));
    return 1;
  } finally {
    client.close();
  }
}

/** GenerationParams from the command line; unset options are left out, so the server's defaults apply. */
function generationParams(options) {
  const params = { stop: options.stop };
  if (options.temperature !== undefined) params.temperature = Number(options.temperature);
  if (options['max-new-tokens'] !== undefined) params.max_new_tokens = Number(options['max-new-tokens']);
  if (options.seed !== undefined) params.seed = options.seed; // uint64: passed as a string
  return params;
}

/** Streams a generation: one line per delta as it arrives, then why it ended and the token counts. */
async function showGeneration(client, request) {
  let last = null;
  for await (const response of generate(client, request, GENERATE_TIMEOUT_MS)) {
    print({ text: response.text || '', token_ids: response.token_ids || [] });
    last = response;
  }
  if (!last || !last.finish_reason) throw new Error('the Generate stream ended without its last message');
  print({
    finish_reason: last.finish_reason.replace(/^FINISH_REASON_/, '').toLowerCase(), // stop, length, stop_sequence
    stop_sequence: last.stop_sequence || null,
    usage: last.usage,
    model: last.model,
    model_version: last.model_version,
  });
}

/** The two ways a Tandem error reaches a caller: a failed unary call, and a failed request inside a stream. */
async function showErrors(client, model) {
  const cases = [
    ['empty inputs', { model, inputs: [] }],
    ['unknown model', { model: 'no-such-model', inputs: ['hello'] }],
  ];
  for (const [name, request] of cases) {
    try {
      await unary(client, 'Embed', request);
      throw new Error(`${name}: the call succeeded, expected an error`);
    } catch (err) {
      if (err.code === undefined) throw err;
      print({ case: name, ...decodeError(err) });
    }
  }
  // A stream reports a failed request in that request's response (StreamError) and goes on with the rest.
  const requests = [
    { id: 'ok', request: { model, inputs: ['fine'] } },
    { id: 'bad', request: { model, inputs: [] } },
  ];
  for await (const { id, error } of embedStream(client, requests)) {
    if (!error) continue;
    print({
      case: 'stream request with empty inputs',
      id,
      code: error.code,
      code_name: grpc.status[error.code],
      message: error.message,
      reason: error.reason,
      field_violations: (error.fields || []).map((field) => ({ field })),
    });
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(err);
    process.exitCode = 1;
  },
);
