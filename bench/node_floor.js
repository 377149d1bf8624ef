// The least Node.js worker doing the original sidecar's shell-task path: a floor
// for the original, not the original (which is not available on this machine).
//
//     node bench/node_floor.js --config sidecar.toml                    # latency.py --node
//     node bench/node_floor.js --config sidecar.toml --original-steps   # latency.py --node-model
//
// Same runtime and WebSocket library (`ws`) as the Node sidecar, the same frames in
// the same order, and nothing else: identify; per task `task_accepted` at once, the
// command run by `child_process.spawn('/bin/sh', ['-c', cmd])` in a group of its own
// with both pipes collected, then `task_complete` (or `task_failed`). Unlike the
// original it has no queue file, progress emitter, dispatcher, retries, cost, logs or
// reconnect. The original does at least these steps on this runtime, so its latency
// can only be higher: a sidecar under 0.8x of this floor, side by side, is under 0.8x
// of the original.
//
// With --original-steps it also does, per task, the synchronous work the original's
// source (sidecar/index.js, lib/queue.js, lib/log.js, lib/execution/*.js, read, not
// copied) does on this path, in the same places: the queue file written three times
// through the original's own dependency, `write-file-atomic` 5 (`sync`, whose default
// fsyncs the temporary file before the rename): the task as active before
// `task_accepted`, again as `working`, and empty after `task_complete`; the two info
// log lines (`task_received`, `execution_dispatch`), each a JSON object with a stack
// capture for the caller's name and line, written to stdout and to an append stream;
// the command spawned with `shell: true` and a copy of the environment, under a 60 s
// timer. It still leaves out the original's other steps (the chokidar watcher, the
// resource reports, the cost table, the progress emitter's object, the task-generation
// map), so it remains a floor for the original: a tighter one. NODE_FLOOR_FSYNC=0 in the
// environment turns the fsync off, to size its share; the original has no such setting.
//
// Config: the `key = <JSON>` lines bench/latency.py writes; reads agent_id, token, hub_url.
// `ws` comes from .tools/node-floor (bench/node-floor-install.sh).
'use strict';
const fs = require('fs');
const os = require('os');
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

function successFrame(task, generation, output, started) {
  return {
    type: 'task_complete',
    task_id: task.task_id,
    generation,
    tokens_used: 0,
    result: {
      status: 'success',
      output,
      model_used: 'none',
      tokens_in: 0,
      tokens_out: 0,
      estimated_cost_usd: 0,
      equivalent_claude_cost_usd: null,
      execution_ms: Date.now() - started,
    },
  };
}

const exitError = (code, signal) => (code === null ? `killed by ${signal}` : `exit code ${code}`);

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
      send(successFrame(task, generation, Buffer.concat(out).toString(), started));
    } else {
      send({ type: 'task_failed', task_id: task.task_id, generation, error: exitError(code, signal) });
    }
  });
}

// --original-steps: the original's per-task synchronous work (see the header).
const originalSteps = process.argv.includes('--original-steps');
const root = path.dirname(path.resolve(configPath));
let writeFileAtomic = null;
let logStream = null;
const queue = { active: null, recovering: null };
const queuePath = path.join(root, 'queue.json');
// NODE_FLOOR_FSYNC=0 turns write-file-atomic's fsync off, to size its share (the original keeps it on).
const fsyncOption = { fsync: process.env.NODE_FLOOR_FSYNC !== '0' };
const saveQueue = () => writeFileAtomic.sync(queuePath, JSON.stringify(queue, null, 2), fsyncOption);

function logLine(level, event, data) {
  // The caller's function name and line from a fresh stack, as the original's logger takes them.
  const frame = (new Error().stack || '').split('\n')[2] || '';
  const m = frame.match(/at\s+(?:(.+?)\s+\()?.*?:(\d+):\d+\)?/);
  const entry = {
    time: new Date().toISOString(),
    severity: level,
    message: event,
    module: 'sidecar/index',
    pid: process.pid,
    node: os.hostname(),
    agent_id: config.agent_id,
    function: m ? m[1] || null : null,
    line: m ? parseInt(m[2], 10) || null : null,
    ...data,
  };
  const line = JSON.stringify(entry) + '\n';
  process.stdout.write(line);
  logStream.write(line);
}

function runTaskOriginalSteps(msg) {
  const generation = msg.generation || 0;
  const task = {
    task_id: msg.task_id,
    description: msg.description,
    metadata: msg.metadata || {},
    status: 'accepted',
    assigned_at: msg.assigned_at || Date.now(),
    generation,
    wake_attempts: 0,
    repo: msg.repo || null,
    branch: msg.branch || null,
    file_hints: msg.file_hints || [],
    success_criteria: msg.success_criteria || [],
    verification_steps: msg.verification_steps || [],
    complexity: msg.complexity || null,
    skip_verification: msg.skip_verification || false,
    verification_timeout_ms: msg.verification_timeout_ms || null,
    routing_decision: msg.routing_decision || null,
  };
  queue.active = task;
  saveQueue();
  send({ type: 'task_accepted', task_id: task.task_id });
  logLine('info', 'task_received', { task_id: task.task_id, description: task.description });
  task.status = 'working';
  saveQueue();
  const routing = task.routing_decision || {};
  logLine('info', 'execution_dispatch', {
    task_id: task.task_id,
    target_type: routing.target_type || 'sidecar',
    model: routing.selected_model || null,
    endpoint: routing.selected_endpoint || null,
  });
  const started = Date.now();
  const finish = (frame) => {
    send(frame);
    queue.active = null;
    saveQueue();
  };
  const cmd = task.metadata.shell_command;
  if (typeof cmd !== 'string' || cmd === '') {
    finish({ type: 'task_failed', task_id: task.task_id, generation, error: 'no metadata.shell_command' });
    return;
  }
  const child = spawn(cmd, [], { shell: true, cwd: process.cwd(), env: { ...process.env } });
  const timer = setTimeout(() => child.kill('SIGTERM'), 60000);
  let stdout = '';
  child.stdout.on('data', (b) => {
    stdout += b.toString();
  });
  child.stderr.on('data', () => {});
  child.on('error', (e) => console.error(`node floor: spawn: ${e.message}`));
  child.on('close', (code, signal) => {
    clearTimeout(timer);
    if (code === 0) {
      const frame = successFrame(task, generation, stdout, started);
      frame.verification_report = null;
      finish(frame);
    } else {
      finish({ type: 'task_failed', task_id: task.task_id, generation, error: exitError(code, signal) });
    }
  });
}

if (originalSteps) {
  writeFileAtomic = require(path.join(__dirname, '..', '.tools', 'node-floor', 'node_modules', 'write-file-atomic'));
  logStream = fs.createWriteStream(path.join(root, 'sidecar.log'), { flags: 'a' });
}
const onTask = originalSteps ? runTaskOriginalSteps : runTask;

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
  if (frame && frame.type === 'task_assign') onTask(frame);
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
