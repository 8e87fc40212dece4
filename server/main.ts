/**
 * The composition root: configuration, stores, dependencies, seed, listen. The only place
 * that wires real resources together.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { childEnv } from './config.ts';
import { createApp } from './app.ts';
import { buildDeps } from './bootstrap.ts';
import { ConfigError, loadConfig } from './config.ts';
import type { Config } from './config.ts';
import { AdminService } from './admin-service.ts';
import { DEMO_KEY_FILE, demoRetiredAt, seedDemo } from './demo.ts';
import { asBootError, reportBootFailure } from './boot-failure.ts';
import { createLogger } from './logger.ts';
import type { Logger } from './logger.ts';
import { loadRegionMatrix } from './regions.ts';
import type { RegionMatrix } from './regions.ts';

/** Starts the service; resolves once it listens. */
export async function serve(
  config: Config,
  log: Logger = createLogger({ level: config.logLevel, base: { region: config.region } }),
): Promise<{ server: Server; close(): Promise<void> }> {
  const deps = await buildDeps(config, log);
  let seeded = false;
  const demoRetired = config.seedDemo ? await demoRetiredAt(deps.controlPlane) : undefined;
  if (config.seedDemo && demoRetired === undefined) {
    seeded = await seedDemo({
      dataDir: config.dataDir,
      region: config.region,
      controlPlane: deps.controlPlane,
      admin: new AdminService({
        controlPlane: deps.controlPlane,
        evaluator: deps.evaluator,
        regions: deps.matrix.regions,
        packCheck: config.packCheck,
      }),
    }).catch((err: unknown) => {
      // An invalid shipped pack: reportBootFailure prints its problems.
      throw asBootError('demo pack', 'CELLCDS_SEED_DEMO (rules/packs/medication-safety)', err);
    });
  }
  // Compile the subscribed packs in the workers now, not out of the first calls' budgets.
  const warmed = await deps.directory.warmSubscribedPacks(deps.evaluator);
  const lifecycle = { shuttingDown: false };
  const app = createApp({ ...deps, lifecycle });
  const server = await new Promise<Server>((resolve, reject) => {
    const s = createServer(SLOW_CLIENT_LIMITS, app).listen(config.port, () => {
      resolve(s);
    });
    s.once('error', reject);
  });
  // The versions subscribed from now on (here or on another replica): in the background.
  const stopWatching = deps.directory.watchSubscriptions(deps.evaluator, log);
  log.info(
    {
      port: config.port,
      publicUrl: config.publicUrl,
      // Every replica of a region logs the same id: the keyring its stores are bound to.
      keyringId: (await deps.keyProvider.describe()).keyringId,
      seeded,
      // `id version`, not `id@version`: an `id@1.3.0-rc.beta1` is e-mail shaped, so censored.
      warmedPacks: warmed.map((v) => v.replace('@', ' ')),
    },
    'listening',
  );
  printBanner(config, seeded, demoRetired);
  const inFlight = trackResponses(server, lifecycle);
  return {
    server,
    async close() {
      // No look starts now; one in flight (reading the control plane, compiling a version)
      // ends before the dependencies it uses close.
      const watching = stopWatching();
      await drain(server, inFlight, lifecycle, log, config.shutdownGraceMs);
      await watching;
      await deps.close();
      log.info('stopped');
    },
  };
}

/**
 * The responses not finished yet. While shutting down, every response (those in flight, and
 * new calls on keep-alive connections) carries `Connection: close`, so clients move on.
 */
function trackResponses(server: Server, lifecycle: { shuttingDown: boolean }): Set<ServerResponse> {
  const open = new Set<ServerResponse>();
  server.on('request', (_req: IncomingMessage, res: ServerResponse) => {
    if (lifecycle.shuttingDown) {
      res.setHeader('Connection', 'close');
    }
    open.add(res);
    res.once('close', () => open.delete(res));
  });
  return open;
}

/**
 * Graceful stop (SIGTERM/SIGINT): `/readyz` answers 503 `shuttingDown`, the listener stops
 * accepting connections, idle keep-alive connections close at once and busy ones after their
 * answer (`Connection: close`); calls still running after `graceMs` are cut off. Resolves once
 * every connection is closed. Calls that answered wrote their records first (as always).
 */
async function drain(
  server: Server,
  inFlight: Set<ServerResponse>,
  lifecycle: { shuttingDown: boolean },
  log: Logger,
  graceMs: number,
): Promise<void> {
  lifecycle.shuttingDown = true;
  log.info({ inFlight: inFlight.size, graceMs }, 'shutting down');
  for (const res of inFlight) {
    if (!res.headersSent) {
      res.setHeader('Connection', 'close');
    }
  }
  const closed = new Promise<void>((resolve) => {
    server.close(() => {
      resolve();
    });
  });
  server.closeIdleConnections();
  const deadline = setTimeout(() => {
    log.warn({ inFlight: inFlight.size }, 'shutdown grace period over: closing every connection');
    server.closeAllConnections();
  }, graceMs);
  deadline.unref();
  await closed;
  clearTimeout(deadline);
}

/**
 * Slow clients (a connection trickling its headers or body) are cut off: headers within 20 s,
 * the whole request within 120 s (a 4 MB pack upload on a slow link fits), looked at every 5 s.
 * Node's defaults (60 s, 5 minutes, every 30 s) let a few hundred such connections hold the
 * process's sockets for minutes.
 */
const SLOW_CLIENT_LIMITS = {
  headersTimeout: 20_000,
  requestTimeout: 120_000,
  connectionsCheckingInterval: 5_000,
} as const;

/**
 * The settings a CLI in another terminal of the same folder needs to find this server and its
 * data: none on the defaults (port 8080, ./var).
 */
function cliEnvFor(config: Config): string {
  const env: string[] = [];
  if (config.dataDirSet) {
    env.push(`CELLCDS_DATA_DIR=${config.dataDir}`);
  }
  if (config.publicUrl !== 'http://localhost:8080') {
    env.push(`CELLCDS_PUBLIC_URL=${config.publicUrl}`);
  }
  return env.map((e) => `${e} `).join('');
}

/**
 * The startup banner (stderr). The demo command signs with the demo EHR key of this data
 * directory, which only the process that seeded the demo has (not another replica, nor a server
 * started with `CELLCDS_SEED_DEMO=false` on a fresh folder): printed only where it would work.
 */
function printBanner(config: Config, seeded: boolean, demoRetired: string | undefined): void {
  const tokenWhere = config.adminToken
    ? 'CELLCDS_ADMIN_TOKEN'
    : `${config.dataDir}/admin-token (mode 0600)`;
  // The key of a deprovisioned demo tenant signs for nobody.
  const hasDemoKey =
    demoRetired === undefined && fs.existsSync(path.join(config.dataDir, DEMO_KEY_FILE));
  const lines = [
    '',
    `cellcds is listening on ${config.publicUrl}  (region ${config.region}, data in ${config.dataDir})`,
    seeded
      ? 'Seeded: demo tenant "demo", a demo EHR issuer key and the medication-safety pack.'
      : '',
    demoRetired !== undefined
      ? `Not seeded: the demo tenant "demo" was deprovisioned on ${demoRetired} and tenant ids ` +
        'are never reused. Set CELLCDS_SEED_DEMO=false to stop checking.'
      : '',
    '',
    ...(hasDemoKey
      ? [
          'Try it (signs an order-sign call with the demo EHR key and prints the cards):',
          `  ${cliEnvFor(config)}npx cellcds call order-sign --demo`,
          '',
        ]
      : []),
    `Operator token for the admin API: ${tokenWhere}`,
    '',
  ].filter((l, i, all) => l !== '' || all[i - 1] !== '');
  process.stderr.write(`${lines.join('\n')}\n`);
}

/** `npm start` / `cellcds serve`: load config, serve until SIGTERM/SIGINT. */
export async function runServe(overrides: Record<string, string> = {}): Promise<void> {
  let config: Config;
  try {
    config = loadConfig(undefined, overrides);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  if (config.regionsFile && !config.regionExplicit) {
    let matrix: RegionMatrix;
    try {
      matrix = loadRegionMatrix(config.regionsFile, {
        dataDir: config.dataDir,
        publicUrl: config.publicUrl,
      });
    } catch (err) {
      if (err instanceof ConfigError) {
        process.stderr.write(`${err.message}\n`);
        process.exit(2);
      }
      throw err;
    }
    superviseRegions(matrix, config.shutdownGraceMs);
    return;
  }
  const log = createLogger({ level: config.logLevel, base: { region: config.region } });
  if (config.unknownSettings.length > 0) {
    // A mistyped setting would otherwise be ignored in silence (names only, never values).
    log.warn({ settings: config.unknownSettings }, 'unknown settings ignored');
  }
  let running: Awaited<ReturnType<typeof serve>>;
  try {
    running = await serve(config, log);
  } catch (err) {
    // What only shows once the service connects to its dependencies (an evicting Redis).
    if (err instanceof ConfigError) {
      log.fatal({ component: 'configuration', err }, 'boot failed');
      process.stderr.write(`${err.message}\n`);
      process.exit(2);
    }
    // A component that did not start: a fatal JSON line naming it and the setting to check,
    // and the line for humans on stderr; exit 1 as before.
    reportBootFailure(log, err);
    process.exit(1);
  }
  let stopping = false;
  const stop = (): void => {
    if (stopping) {
      return;
    }
    stopping = true;
    running.close().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

/**
 * One process per region (docs/regions.md): each plane runs `serve --region R` on the port of
 * its region's public URL, so a plane only ever holds its own region's keys and stores in
 * memory. If any plane exits, the others are stopped and this process exits non-zero: a
 * half-running deployment fails loudly instead of silently serving fewer regions.
 */
function superviseRegions(matrix: RegionMatrix, graceMs: number): void {
  const cli = fileURLToPath(new URL('./cli.ts', import.meta.url));
  const children = matrix.regions.map((region) => {
    const url = new URL(region.publicUrl);
    const port = url.port || (url.protocol === 'https:' ? '443' : '80');
    const child = spawn(
      process.execPath,
      [...process.execArgv, cli, 'serve', '--region', region.id],
      {
        env: { ...childEnv(), PORT: port, CELLCDS_PUBLIC_URL: region.publicUrl },
        stdio: 'inherit',
      },
    );
    return { region: region.id, child };
  });
  let stopping = false;
  const stopAll = (code: number): void => {
    if (stopping) {
      return;
    }
    stopping = true;
    for (const { child } of children) {
      child.kill('SIGTERM');
    }
    // Each plane drains for up to its grace period (CELLCDS_SHUTDOWN_GRACE_MS) before it exits.
    setTimeout(() => process.exit(code), graceMs + 5000).unref();
    void Promise.all(children.map(({ child }) => new Promise((r) => child.once('exit', r)))).then(
      () => {
        process.exit(code);
      },
    );
  };
  for (const { region, child } of children) {
    child.once('exit', (code) => {
      if (!stopping) {
        process.stderr.write(
          `cellcds: the ${region} plane exited (${String(code)}); stopping the others\n`,
        );
        stopAll(1);
      }
    });
  }
  process.once('SIGTERM', () => {
    stopAll(0);
  });
  process.once('SIGINT', () => {
    stopAll(0);
  });
  process.stderr.write(
    `cellcds: one plane per region: ${matrix.regions.map((r) => `${r.id} at ${r.publicUrl}`).join(', ')}\n`,
  );
}
