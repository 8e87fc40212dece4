/**
 * SIGTERM on a busy server (on-call review, finding D): the real server process, started as
 * `npm start` starts it, keeps answering a keep-alive client until the signal; then it logs
 * "shutting down", /readyz answers 503 (or the port refuses), connections close, it exits within
 * CELLCDS_SHUTDOWN_GRACE_MS and logs "stopped", and every call it answered 200 has its record
 * (read back by reopening the data folder after exit).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { createLocalKeyProvider, openRegionStores } from '../../tenants/index.ts';
import { ConfigError, loadConfig } from '../../server/config.ts';
import { freePort, startServer } from '../helpers/processes.ts';
import type { ServerProcess } from '../helpers/processes.ts';

const GRACE_MS = 8000;
const TOKEN = `op-${'s'.repeat(40)}`;
const TENANT = 'hosp';

interface Answer {
  status: number;
  hookInstance: string;
  connection: string | undefined;
  at: number;
}

/** One POST on `agent`; resolves with the status, or rejects on a refused or reset connection. */
function post(
  agent: http.Agent,
  url: URL,
  token: string,
  body: unknown,
): Promise<{ status: number; connection: string | undefined }> {
  const payload = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = http.request(
      url,
      {
        method: 'POST',
        agent,
        headers: {
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(payload),
          authorization: `Bearer ${token}`,
        },
      },
      (res) => {
        res.resume();
        res.on('end', () => {
          resolve({ status: res.statusCode ?? 0, connection: res.headers.connection });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

/** GET /readyz on a fresh connection: the status, or 0 when the connection is refused. */
function readyz(port: number): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/readyz', agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', () => {
      resolve(0);
    });
    req.setTimeout(2000, () => {
      req.destroy();
    });
  });
}

describe('server: SIGTERM drains keep-alive connections and exits within the grace period', function () {
  this.timeout(180_000);
  let dataDir: string;
  let port: number;
  let server: ServerProcess | undefined;
  let issuer: TestIssuer;

  before(async () => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-shutdown-'));
    port = await freePort();
    server = await startServer({
      ...process.env,
      PORT: String(port),
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_ADMIN_TOKEN: TOKEN,
      CELLCDS_PUBLIC_URL: `http://127.0.0.1:${String(port)}`,
      CELLCDS_LOG_LEVEL: 'info',
      CELLCDS_SHUTDOWN_GRACE_MS: String(GRACE_MS),
      CELLCDS_SEED_DEMO: 'false',
    });
    // A tenant on a small pack, set up through the admin API like an operator would.
    issuer = await TestIssuer.create({ iss: 'https://ehr-hosp.test.example' });
    const admin = async (method: string, p: string, body: unknown): Promise<void> => {
      const res = await fetch(`http://127.0.0.1:${String(port)}${p}`, {
        method,
        headers: { 'content-type': 'application/json', authorization: `Bearer ${TOKEN}` },
        body: JSON.stringify(body),
      });
      if (!res.ok) {
        throw new Error(`${method} ${p}: ${String(res.status)} ${await res.text()}`);
      }
    };
    await admin('POST', '/admin/rule-packs', tinyPack('tiny'));
    await admin('POST', '/admin/tenants', {
      id: TENANT,
      name: 'Hospital',
      region: 'local',
      issuers: [{ iss: issuer.iss, jwks: issuer.publicJwks() }],
      fhirServers: [],
    });
    await admin('PUT', `/admin/tenants/${TENANT}/subscriptions`, [
      { pack: 'tiny', version: '1.0.0' },
    ]);
  });
  after(() => {
    server?.child.kill('SIGKILL');
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('answers in-flight and keep-alive calls with Connection: close, refuses new ones, keeps every record', async () => {
    const proc = server;
    if (!proc) {
      throw new Error('the server did not start');
    }
    const url = new URL(`http://127.0.0.1:${String(port)}/cds-services/tiny-order-sign`);
    const sign = (): Promise<string> => issuer.sign({ aud: url.toString() });

    const agent = new http.Agent({ keepAlive: true, maxSockets: 3 });
    const answers: Answer[] = [];
    const state = { exited: false };
    let signalAt = Number.POSITIVE_INFINITY;
    const exit = new Promise<number | null>((resolve) => {
      proc.child.once('exit', (code) => {
        state.exited = true;
        resolve(code);
      });
    });
    // A keep-alive client that never stops on its own: it sends until the process is gone.
    const worker = async (): Promise<void> => {
      while (!state.exited && answers.length < 800) {
        const hookInstance = crypto.randomUUID();
        try {
          const r = await post(agent, url, await sign(), warfarinNsaidRequest(hookInstance));
          answers.push({ ...r, hookInstance, at: Date.now() });
        } catch {
          await new Promise((r) => setTimeout(r, 20)); // refused or reset: try again
        }
      }
    };
    const workers = [worker(), worker(), worker()];
    while (answers.filter((a) => a.status === 200).length < 20) {
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(await readyz(port)).to.equal(200);

    signalAt = Date.now();
    proc.child.kill('SIGTERM');
    const probes: number[] = [];
    const probing = (async () => {
      while (!state.exited) {
        probes.push(await readyz(port));
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    const code = await Promise.race([
      exit,
      new Promise<'timeout'>((r) =>
        setTimeout(() => {
          r('timeout');
        }, GRACE_MS + 5000),
      ),
    ]);
    expect(code, 'exits within the grace period').to.equal(0);
    expect(Date.now() - signalAt).to.be.below(GRACE_MS + 5000);
    await Promise.all([...workers, probing]);
    agent.destroy();

    // /readyz after the signal: 503 (shutting down) or a refused connection, never 200.
    expect(probes.length).to.be.greaterThan(0);
    expect(probes.filter((s) => s === 200)).to.deep.equal([]);
    // Answers after the signal tell the client to close its connection.
    const late = answers.filter((a) => a.at > signalAt + 500);
    for (const a of late) {
      expect(a.connection).to.equal('close');
    }
    // Both log lines (JSON on stdout).
    const lines = proc
      .stdout()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { msg?: string; level?: string });
    expect(lines.find((l) => l.msg === 'shutting down')).to.include({ level: 'info' });
    expect(lines.find((l) => l.msg === 'stopped')).to.include({ level: 'info' });

    // Every 200 has its record.
    const ok = answers.filter((a) => a.status === 200);
    expect(ok.length).to.be.greaterThan(0);
    const keyProvider = await createLocalKeyProvider({
      keyDir: path.join(dataDir, 'keys'),
      region: 'local',
    });
    const stores = await openRegionStores({ region: 'local', dataDir, keyProvider });
    try {
      const recorded = new Set(
        (await stores.store(TENANT).listInvocations({ limit: 1000 })).map((r) => r.hookInstance),
      );
      const missing = ok.filter((a) => !recorded.has(a.hookInstance));
      expect(missing, 'answered 200 without a record').to.deep.equal([]);
    } finally {
      await stores.close();
    }
  });
});

describe('configuration: CELLCDS_SHUTDOWN_GRACE_MS', () => {
  it('is 20 s by default, or as set', () => {
    expect(loadConfig({}).shutdownGraceMs).to.equal(20_000);
    expect(loadConfig({ CELLCDS_SHUTDOWN_GRACE_MS: '5000' }).shutdownGraceMs).to.equal(5000);
  });

  it('stops the boot on a negative or non-numeric grace period, naming the setting', () => {
    for (const bad of ['-1', 'soon', '600001']) {
      expect(() => loadConfig({ CELLCDS_SHUTDOWN_GRACE_MS: bad })).to.throw(
        ConfigError,
        'CELLCDS_SHUTDOWN_GRACE_MS',
      );
    }
  });
});
