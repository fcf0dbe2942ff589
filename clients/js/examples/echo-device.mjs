import { GatewayDevice } from '@device-gateway/device-sdk';

const device = new GatewayDevice({
  url: process.env.GATEWAY_WS_URL, // wss://gateway.example.com/api/v1/ws/device
  deviceId: 'laptop-1',
  getToken: async () => process.env.DEVICE_TOKEN, // in the app: ask your backend
  tools: {
    echo: async (args) => args,
  },
});
device.start();
