// Compiled (never run) by `tsc -p .`: the README's usage type-checks against
// src/index.d.ts, and the misuses marked @ts-expect-error are refused.
import { GatewayDevice, GatewayAbortError, backoffDelay, tokenExpiry } from '@device-gateway/device-sdk';

const device = new GatewayDevice({
  url: 'wss://gateway.example.com/api/v1/ws/device',
  deviceId: 'laptop-1',
  getToken: async () => 'jwt',
  eventAcks: true,
  tools: {
    echo: async (args) => args,
    slow: async (_args, { signal, progress }) => {
      progress(0.5, 'half way');
      return signal.aborted ? null : 'done';
    },
  },
  agents: {
    count: async function* (input: { to: number }) {
      for (let n = 1; n <= input.to; n += 1) yield { n };
    },
    summarise: async (input, { emit, signal, runId }) => {
      await emit({ runId, input });
      if (signal.reason instanceof GatewayAbortError) return signal.reason.reason;
      return { ok: true };
    },
  },
});
device.addEventListener('close', (event) => {
  const code: number = event.detail.code;
  const again: boolean = event.detail.willReconnect;
  void code; void again;
});
device.addEventListener('open', (event) => void event.detail.runs.length);
device.start().stop('bye');
const state: 'idle' | 'connecting' | 'open' | 'waiting' | 'stopped' = device.state;
const delay: number = backoffDelay(3, { initialMs: 100, maxMs: 1000 });
const exp: number | null = tokenExpiry('a.b.c');
void state; void delay; void exp;

// @ts-expect-error: deviceId is required
new GatewayDevice({ url: 'ws://x', getToken: async () => 'jwt' });
// @ts-expect-error: getToken returns a token string
new GatewayDevice({ url: 'ws://x', deviceId: 'd', getToken: async () => 42 });
// @ts-expect-error: a tool is a function
new GatewayDevice({ url: 'ws://x', deviceId: 'd', getToken: () => 'jwt', tools: { echo: 'no' } });
