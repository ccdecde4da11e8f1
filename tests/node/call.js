// Calls a loraserve server from Node with nothing but the repository's proto/ directory:
// @grpc/proto-loader loads the contract, @grpc/grpc-js calls Generate and GenerateStream, and
// the vendored google/rpc protos decode the ErrorInfo in grpc-status-details-bin (with
// protobufjs, the library proto-loader is built on); ListModels, and Generate from chat messages.
// Prints one JSON object.
//   node call.js PROTO_DIR TARGET PROMPT QUESTION   (NODE_PATH: where the npm packages are)
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const [protoDir, target, prompt, question] = process.argv.slice(2);
const options = {keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [protoDir]};
const definition = protoLoader.loadSync(
  ['loraserve/v1/inference.proto', 'google/rpc/status.proto', 'google/rpc/error_details.proto'], options);
const v1 = grpc.loadPackageDefinition(definition).loraserve.v1;
const client = new v1.InferenceService(target, grpc.credentials.createInsecure());

// The vendored protos; google/protobuf/*.proto are protobufjs's built-in well-known types.
const root = new protobuf.Root();
root.resolvePath = (origin, file) => file.startsWith('google/protobuf/') ? file : path.join(protoDir, file);
root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = root.lookupType('google.rpc.Status');
const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');

function routed(adapter) {
  const md = new grpc.Metadata();
  md.set('x-adapter-id', adapter);
  return md;
}

function generate(adapter) {
  return new Promise((resolve, reject) => client.Generate(
    {adapter_id: adapter, prompt, max_new_tokens: 8}, routed(adapter), {deadline: Date.now() + 60000},
    (err, res) => (err ? reject(err) : resolve(res))));
}

function stream(adapter) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client.GenerateStream({adapter_id: adapter, prompt, max_new_tokens: 8}, routed(adapter),
      {deadline: Date.now() + 60000});
    call.on('data', (m) => messages.push(m));
    call.on('error', reject);
    call.on('end', () => resolve(messages));
  });
}

function chat(adapter, content) {
  return new Promise((resolve, reject) => client.Generate(
    {adapter_id: adapter, messages: [{role: 'user', content}], max_new_tokens: 8}, routed(adapter),
    {deadline: Date.now() + 60000}, (err, res) => (err ? reject(err) : resolve(res))));
}

function listModels() {
  return new Promise((resolve, reject) => client.ListModels(
    {}, new grpc.Metadata(), {deadline: Date.now() + 60000}, (err, res) => (err ? reject(err) : resolve(res))));
}

function errorInfo(err) {
  const [bin] = err.metadata.get('grpc-status-details-bin');
  const status = Status.decode(bin);
  const any = status.details.find((d) => d.type_url.endsWith('/google.rpc.ErrorInfo'));
  const info = ErrorInfo.decode(any.value);
  return {code: err.code, status_code: status.code, reason: info.reason, domain: info.domain,
          metadata: info.metadata};
}

(async () => {
  const out = {};
  const unary = await generate('legal');
  out.generate = {text: unary.text, adapter: unary.adapter.id, version: unary.adapter.version,
                  output_tokens: unary.usage.output_tokens, finish_reason: unary.finish_reason,
                  load_source: unary.adapter.load_source};
  const messages = await stream('legal');
  const last = messages[messages.length - 1];
  out.stream = {text: messages.map((m) => m.text).join(''), messages: messages.length,
                finish_reason: last.finish_reason, adapter: last.adapter.id};
  const models = await listModels();
  out.models = {base: models.base.id, max_context: models.base.max_context,
                has_chat_template: models.base.has_chat_template,
                adapters: models.adapters.map((a) => `${a.id}@${a.version}`).sort()};
  out.chat = (await chat('legal', question)).text;
  try {
    await generate('ghost');
  } catch (err) {
    out.error = errorInfo(err);
  }
  client.close();
  process.stdout.write(JSON.stringify(out) + '\n');
})().catch((err) => {
  process.stderr.write(String(err.stack || err) + '\n');
  process.exit(1);
});
