// The least Node.js worker doing the original sidecar's shell-task path: a floor
// for the original, not the original (which is not available on this machine).
//
//     node bench/node_floor.js --config sidecar.toml     # launched by latency.py --node
//
// Same runtime and WebSocket library (`ws`) as the Node sidecar, the same frames in
// the same order, and nothing else: identify; per task `task_accepted` at once, the
// command run by `child_process.spawn('/bin/sh', ['-c', cmd])` in a group of its own
// with both pipes collected, then `task_complete` (or `task_failed`). Like the
// original it writes nothing durably; unlike it, it has no queue file, progress
// emitter, dispatcher, retries, cost, logs or reconnect. The original does at least
// these steps on this runtime, so its latency can only be higher: a sidecar under
// 0.8x of this floor, side by side, is under 0.8x of the original.
//
// Config: the `key = <JSON>` lines bench/latency.py writes; reads agent_id, token, hub_url.
// `ws` comes from .tools/node-floor (bench/node-floor-install.sh).
'use strict';
const fs = require('fs');
const path = require('path');
const { spawn } = require('child_process');
const WebSocket = require(path.join(__dirname, '..', '.tools', 'node-floor', 'node_modules', 'ws'));

const configPath = process.argv[process.argv.indexOf('--config') + 1];
const config = {};
for (const line of fs.readFileSync(configPath, 'utf8').split('\n')) {
  const i = line.indexOf(' = ');
  if (i > 0) config[line.slice(0, i).trim()] = JSON.parse(line.slice(i + 3));
}

// No permessage-deflate: the dev hub (hypercorn) would negotiate it, and `ws` then inflates
// every inbound frame in libuv's thread pool (~10 ms a task here); the real hub's Cowboy
// does not compress unless configured to, so the original does not pay that either.
const ws = new WebSocket(config.hub_url, { perMessageDeflate: false });
let stopping = false;
const send = (frame) => ws.send(JSON.stringify({ ...frame, protocol_version: 1 }));

function runTask(task) {
  send({ type: 'task_accepted', task_id: task.task_id });
  const started = Date.now();
  const generation = task.generation ?? 0;
  const cmd = task.metadata && task.metadata.shell_command;
  if (typeof cmd !== 'string' || cmd === '') {
    send({ type: 'task_failed', task_id: task.task_id, generation, error: 'no metadata.shell_command' });
    return;
  }
  const child = spawn('/bin/sh', ['-c', cmd], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const out = [];
  child.stdout.on('data', (b) => out.push(b));
  child.stderr.resume(); // drained, not kept: the result carries stdout only
  // A failed spawn emits 'error' and then 'close' (code -errno): the 'close' below reports it.
  child.on('error', (e) => console.error(`node floor: spawn: ${e.message}`));
  child.on('close', (code, signal) => {
    if (code === 0) {
      send({
        type: 'task_complete',
        task_id: task.task_id,
        generation,
        tokens_used: 0,
        result: {
          status: 'success',
          output: Buffer.concat(out).toString(),
          model_used: 'none',
          tokens_in: 0,
          tokens_out: 0,
          estimated_cost_usd: 0,
          equivalent_claude_cost_usd: null,
          execution_ms: Date.now() - started,
        },
      });
    } else {
      send({ type: 'task_failed', task_id: task.task_id, generation, error: code === null ? `killed by ${signal}` : `exit code ${code}` });
    }
  });
}

ws.on('open', () => {
  send({
    type: 'identify',
    agent_id: config.agent_id,
    token: config.token,
    name: config.agent_id,
    status: 'idle',
    capabilities: ['code'],
    client_type: 'sidecar',
  });
  setInterval(() => send({ type: 'ping' }), 30000).unref();
});
ws.on('message', (data) => {
  let frame;
  try {
    frame = JSON.parse(data.toString());
  } catch {
    return;
  }
  if (frame && frame.type === 'task_assign') runTask(frame);
});
ws.on('close', () => process.exit(stopping ? 0 : 1));
ws.on('error', (e) => {
  console.error(`node floor: ${e.message}`);
  process.exit(1);
});
process.on('SIGTERM', () => {
  stopping = true;
  ws.close(1001, 'stopping');
  setTimeout(() => process.exit(0), 2000).unref();
});
