/**
 * The composition root: configuration, stores, dependencies, seed, listen. The only place
 * that wires real resources together.
 */
import type { Server } from 'node:http';
import { createApp } from './app.ts';
import { buildDeps } from './bootstrap.ts';
import { ConfigError, loadConfig } from './config.ts';
import type { Config } from './config.ts';
import { AdminService } from './admin-service.ts';
import { seedDemo } from './demo.ts';
import { createLogger } from './logger.ts';

/** Starts the service; resolves once it listens. */
export async function serve(config: Config): Promise<{ server: Server; close(): Promise<void> }> {
  const log = createLogger({ level: config.logLevel, base: { region: config.region } });
  const deps = await buildDeps(config, log);
  let seeded = false;
  if (config.seedDemo) {
    seeded = await seedDemo({
      dataDir: config.dataDir,
      region: config.region,
      controlPlane: deps.controlPlane,
      admin: new AdminService({ controlPlane: deps.controlPlane, evaluator: deps.evaluator }),
    });
  }
  const app = createApp(deps);
  const server = await new Promise<Server>((resolve, reject) => {
    const s = app.listen(config.port, () => {
      resolve(s);
    });
    s.once('error', reject);
  });
  log.info({ port: config.port, publicUrl: config.publicUrl, seeded }, 'listening');
  printBanner(config, seeded);
  return {
    server,
    async close() {
      await new Promise<void>((resolve) =>
        server.close(() => {
          resolve();
        }),
      );
      await deps.close();
    },
  };
}

function printBanner(config: Config, seeded: boolean): void {
  const tokenWhere = config.adminToken
    ? 'CELLCDS_ADMIN_TOKEN'
    : `${config.dataDir}/admin-token (mode 0600)`;
  const lines = [
    '',
    `cellcds is listening on ${config.publicUrl}  (region ${config.region}, data in ${config.dataDir})`,
    seeded
      ? 'Seeded: demo tenant "demo", a demo EHR issuer key and the medication-safety pack.'
      : '',
    '',
    'Try it (signs an order-sign call with the demo EHR key and prints the cards):',
    '  npx cellcds call order-sign --demo',
    '',
    `Operator token for the admin API: ${tokenWhere}`,
    '',
  ].filter((l, i, all) => l !== '' || all[i - 1] !== '');
  process.stderr.write(`${lines.join('\n')}\n`);
}

/** `npm start` / `cellcds serve`: load config, serve until SIGTERM/SIGINT. */
export async function runServe(env?: Record<string, string | undefined>): Promise<void> {
  let config: Config;
  try {
    config = loadConfig(env);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  const running = await serve(config);
  const stop = (): void => {
    running.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}
