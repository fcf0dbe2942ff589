// Idle devices as most Electron main processes run them: Node's `ws`, which
// offers permessage-deflate by default (perMessageDeflate: true).
//
// Driven by benchmarks/load.py over stdin/stdout, one JSON line each way:
//   in:  the config; then "go", "stop"
//   out: {"ready"}, {"connected": ...}, {"done": ...}
// Times are process.hrtime (CLOCK_MONOTONIC, like Python's time.monotonic()).
// Also plays one device answering `echo` tool calls ("mode": "device").
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const readline = require('node:readline');

const wsPath = process.env.BENCH_WS_MODULE
  || path.join(__dirname, '..', '..', 'clients', 'js', 'node_modules', 'ws');
const WebSocket = require(wsPath);

const now = () => Number(process.hrtime.bigint()) / 1e9;
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

function b64url(buf) {
  return Buffer.from(buf).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
}

function mint(secret, sub) {
  if (!secret) return 'ceiling-ignores-tokens';
  const iat = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub, iat, exp: iat + 6 * 3600 }));
  const sig = b64url(crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest());
  return `${head}.${body}.${sig}`;
}

function connect(cfg, userId, deviceId, token, onFrame) {
  return new Promise((resolve, reject) => {
    const started = now();
    const url = `${cfg.ws_url}?token=${encodeURIComponent(token)}&user_id=${encodeURIComponent(userId)}`;
    const ws = new WebSocket(url, { perMessageDeflate: cfg.deflate !== false, maxPayload: 0 });
    let acked = false;
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('hello timeout')); }, 60000);
    ws.on('open', () => {
      const hello = { type: 'device_hello', device_id: deviceId };
      if (cfg.agent_ids) hello.agent_ids = cfg.agent_ids;
      ws.send(JSON.stringify(hello));
    });
    ws.on('message', (data) => {
      if (!acked) {
        const frame = JSON.parse(data);
        if (frame.type === 'hello_ack') {
          acked = true;
          clearTimeout(timer);
          resolve({ ws, took: now() - started, extensions: ws.extensions });
        }
        return;
      }
      if (onFrame) onFrame(ws, data);
    });
    ws.on('error', (err) => { if (!acked) { clearTimeout(timer); reject(err); } });
    ws.on('close', (code) => {
      if (!acked) { clearTimeout(timer); reject(new Error(`closed ${code} before hello_ack`)); }
    });
  });
}

async function idle(cfg, lines) {
  const tokens = new Map();
  const per = cfg.devices_per_user;
  const [lo, hi] = cfg.indices;
  for (let i = lo; i < hi; i++) {
    const u = `${cfg.tag}-u${Math.floor(i / per)}`;
    if (!tokens.has(u)) tokens.set(u, mint(cfg.jwt_secret, u));
  }
  out({ ready: { pid: process.pid } });
  if ((await lines.next()).value !== 'go') throw new Error('expected go');
  const sockets = [];
  const latencies = [];
  const failures = [];
  let stopping = false;
  let unexpected = 0;
  const codes = new Set();
  let deflate = 0;
  let next = lo;
  const started = now();
  async function lane() {
    while (next < hi) {
      const i = next++;
      const u = `${cfg.tag}-u${Math.floor(i / per)}`;
      try {
        const { ws, took, extensions } = await connect(cfg, u, `${cfg.tag}-d${i}`, tokens.get(u));
        if (extensions && Object.keys(extensions).length) deflate++;
        ws.on('close', (code) => { if (!stopping) { unexpected++; codes.add(String(code)); } });
        sockets.push(ws);
        latencies.push(took);
      } catch (err) {
        failures.push(String(err).slice(0, 200));
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(cfg.concurrency, hi - lo) }, lane));
  const finished = now();
  out({ connected: { connected: sockets.length, failed: failures.length,
                     failures: failures.slice(0, 3), latencies, started, finished,
                     deflate_negotiated: deflate } });
  const cmd = (await lines.next()).value;
  if (cmd !== 'stop') throw new Error(`expected stop, got ${cmd}`);
  stopping = true;
  const lost = unexpected;
  for (const ws of sockets) ws.terminate();
  out({ done: { unexpected_closes: lost, close_codes: [...codes].slice(0, 5) } });
}

async function device(cfg, lines) {
  let answered = 0;
  const { ws } = await connect(cfg, cfg.user_id, cfg.device_id, mint(cfg.jwt_secret, cfg.user_id),
    (sock, data) => {
      const frame = JSON.parse(data);
      if (frame.type !== 'tool_call' || frame.tool === 'hang') return;
      sock.send(`{"type":"tool_result","id":${JSON.stringify(frame.id)},"result":${JSON.stringify(frame.args ?? null)}}`);
      answered++;
    });
  out({ ready: { pid: process.pid, extensions: Object.keys(ws.extensions || {}) } });
  for (;;) {
    const { value, done } = await lines.next();
    if (done || value === 'stop') break;
  }
  ws.terminate();
  out({ done: { answered } });
}

async function main() {
  const rl = readline.createInterface({ input: process.stdin });
  const lines = rl[Symbol.asyncIterator]();
  const cfg = JSON.parse((await lines.next()).value);
  const hardStop = setTimeout(() => process.exit(3), (cfg.max_s || 600) * 1000);
  hardStop.unref();
  if (cfg.mode === 'device') await device(cfg, lines);
  else await idle(cfg, lines);
  rl.close();
  process.exit(0);
}

main().catch((err) => { out({ error: String(err).slice(0, 500) }); process.exit(2); });
