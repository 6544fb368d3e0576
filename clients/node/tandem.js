'use strict';
// A small Node.js client for Tandem's gateway: stubs built from protos/ at run time, and google.rpc error details.
//
// The .proto files are loaded when the module loads (proto-loader), not compiled ahead, so the client always
// speaks the contract in this checkout: a field renamed or renumbered there changes the client with it.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '../../protos');
// Trimmed copies of googleapis' google/rpc protos (same names and field numbers), shared with the C++ client.
const RPC_PROTO_ROOT = path.resolve(__dirname, '../proto');
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024; // the server's limit; gRPC's default receive limit is 4 MiB
const DEFAULT_TIMEOUT_MS = 30_000;

const definition = protoLoader.loadSync('tandem/gateway/v1/gateway.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the .proto (and as in proto3 JSON with preserved names)
  longs: String, // int64 token ids do not fit a JS number in general
  enums: String,
  defaults: false, // leave unset fields out, as proto3 JSON does
});
const gatewayPackage = grpc.loadPackageDefinition(definition).tandem.gateway.v1;

/** A GatewayService stub for `target` ("host:port"); plaintext unless credentials are given. */
function connect(target, credentials = grpc.credentials.createInsecure()) {
  return new gatewayPackage.GatewayService(target, credentials, {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  });
}

/** Calls a unary method (e.g. "Embed") and resolves with its response; every call gets a deadline. */
function unary(client, method, request, timeoutMs = DEFAULT_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

/**
 * Sends every request over one EmbedStream and yields the responses, which come back in request order.
 * Requests are written as the stream accepts them (write() returning false means: wait for 'drain').
 */
async function* embedStream(client, requests, timeoutMs = DEFAULT_TIMEOUT_MS) {
  const call = client.EmbedStream({ deadline: Date.now() + timeoutMs });
  const writing = (async () => {
    for (const request of requests) {
      if (!call.write(request)) await new Promise((resolve) => call.once('drain', resolve));
    }
    call.end();
  })();
  try {
    for await (const response of call) yield response;
  } finally {
    call.cancel(); // no-op once the stream has ended; stops it when the caller breaks out early
    await writing.catch(() => {});
  }
}

/**
 * Calls Generate and yields each GenerateResponse as it arrives: `text` is the new text since the previous one, and
 * the last also has `finish_reason` ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH" or "FINISH_REASON_STOP_SEQUENCE"),
 * `usage` and `model_version`. `request` is a GenerateRequest: {model, prompt} or {model, messages: [{role,
 * content}]}, with sampling in `params` (GenerationParams, e.g. {max_new_tokens: 64, temperature: 0.7}). Token ids
 * are strings (int64). Breaking out of the loop cancels the call, which stops the generation on the server.
 */
async function* generate(client, request, timeoutMs = DEFAULT_TIMEOUT_MS) {
  const call = client.Generate(request, { deadline: Date.now() + timeoutMs });
  try {
    for await (const response of call) yield response;
  } finally {
    call.cancel(); // no-op once the stream has ended; stops the generation when the caller breaks out early
  }
}

// google.rpc.Status arrives serialized in the `grpc-status-details-bin` trailer; protobufjs (the library
// proto-loader is built on) decodes it and the Any-packed details. google/protobuf/* come bundled with it.
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => path.join(RPC_PROTO_ROOT, target);
rpcRoot.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcRoot.lookupType('google.rpc.Status');

/**
 * The code, message and decoded details of a failed call: ErrorInfo's reason and domain, BadRequest's field
 * violations, RetryInfo's delay. Works for any gRPC error; without a details trailer only code and message are set.
 */
function decodeError(err) {
  const decoded = {
    code: err.code,
    code_name: grpc.status[err.code],
    message: err.details,
    reason: null,
    domain: null,
    field_violations: [],
    retry_delay_s: null,
  };
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return decoded;
  for (const any of Status.decode(bin).details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = rpcRoot.lookup(typeName);
    if (!(type instanceof protobuf.Type)) continue; // a detail type this client does not know: skip it
    const detail = type.toObject(type.decode(any.value), { longs: Number, defaults: true });
    if (typeName === 'google.rpc.ErrorInfo') {
      decoded.reason = detail.reason;
      decoded.domain = detail.domain;
    } else if (typeName === 'google.rpc.BadRequest') {
      decoded.field_violations = detail.field_violations.map(({ field, description }) => ({ field, description }));
    } else if (typeName === 'google.rpc.RetryInfo' && detail.retry_delay) {
      decoded.retry_delay_s = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9;
    }
  }
  return decoded;
}

module.exports = { connect, unary, embedStream, generate, decodeError, grpc };
