// `node --import ./test/global-websocket.mjs app.mjs`: gives Node 20 the
// global WebSocket that browsers and Node >= 22 have, so that the examples run
// exactly as written.
import { WebSocket } from 'ws';

globalThis.WebSocket ??= WebSocket;
