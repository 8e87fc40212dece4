/**
 * The real app on a real port for the card-viewer specs: `buildTestApp` with the public URL set
 * to the port it listens on, and `uiRouter` mounted in front of it with the spec's options
 * (client id, feedback callback). Also the Chromium launcher shared by the browser specs.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import type { Browser } from 'playwright-core';
import { errorHandler } from '../../server/error-handler.ts';
import { uiRouter } from '../../server/ui-routes.ts';
import type { UiRouterOptions } from '../../server/ui-routes.ts';
import { buildTestApp } from './test-app.ts';
import type { TestApp } from './test-app.ts';

export const CHROMIUM = '/usr/bin/chromium';

export interface UiApp {
  t: TestApp;
  /** `http://127.0.0.1:<port>`, also the app's CELLCDS_PUBLIC_URL. */
  base: string;
  server: http.Server;
  /** The composed Express app (uiRouter, then the app). */
  handler: express.Express;
  close(): Promise<void>;
}

/** Starts the app on 127.0.0.1:0 with the card viewer mounted. */
export async function startUiApp(opts: UiRouterOptions = {}): Promise<UiApp> {
  const server = http.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address() as AddressInfo;
  const base = `http://127.0.0.1:${port}`;
  const t = await buildTestApp({ CELLCDS_PUBLIC_URL: base });
  const handler = express();
  handler.disable('x-powered-by');
  handler.use((_req, res, next) => {
    const id = crypto.randomUUID();
    (res.locals as { requestId?: string }).requestId = id;
    res.setHeader('X-Request-Id', id);
    next();
  });
  handler.use(uiRouter(t.deps, opts));
  handler.use(t.app);
  handler.use(errorHandler(t.deps.log));
  server.on('request', handler);
  return {
    t,
    base,
    server,
    handler,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) =>
        server.close(() => {
          resolve();
        }),
      );
      await t.close();
    },
  };
}

/** True if Debian's Chromium is installed; otherwise prints how to install it (once). */
export function hasChromium(): boolean {
  if (fs.existsSync(CHROMIUM)) {
    return true;
  }
  console.log(`  browser specs skipped: ${CHROMIUM} is missing (apt-get install chromium)`);
  return false;
}

/** Launches headless Chromium with the flags the project uses. */
export async function launchChromium(): Promise<Browser> {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}
