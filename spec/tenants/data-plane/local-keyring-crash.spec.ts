import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import {
  KeyUnavailableError,
  createLocalKeyProvider,
  keyringPath,
} from '../../../tenants/data-plane.ts';
import { asInstance, rejection, tmpDir } from './helpers.ts';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WORKER = path.join(HERE, 'child', 'keyring-worker.ts');
const ROOT = path.resolve(HERE, '../../..');
const REGION = 'eu-west';

interface Worker {
  child: ChildProcess;
  lines: string[];
  /** Resolves once a stdout line equals `line` (rejects if the child exits first). */
  waitFor(line: string): Promise<void>;
  exited: Promise<number | null>;
}

function startWorker(args: object): Worker {
  const child = spawn(process.execPath, ['--import', 'tsx', WORKER, JSON.stringify(args)], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  let buffered = '';
  let err = '';
  const waiters: Array<{ line: string; resolve: () => void; reject: (e: Error) => void }> = [];
  child.stderr.on('data', (d: Buffer) => (err += d.toString('utf8')));
  child.stdout.on('data', (d: Buffer) => {
    buffered += d.toString('utf8');
    for (let i = buffered.indexOf('\n'); i >= 0; i = buffered.indexOf('\n')) {
      const line = buffered.slice(0, i);
      buffered = buffered.slice(i + 1);
      lines.push(line);
      for (const w of waiters.filter((x) => x.line === line)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve();
      }
    }
  });
  const exited = new Promise<number | null>((resolve) => {
    child.on('exit', (code, signal) => {
      for (const w of waiters.splice(0)) {
        w.reject(new Error(`worker exited (${code ?? signal}) before "${w.line}": ${err}`));
      }
      resolve(code);
    });
  });
  return {
    child,
    lines,
    exited,
    waitFor: (line) =>
      lines.includes(line)
        ? Promise.resolve()
        : new Promise((resolve, reject) => waiters.push({ line, resolve, reject })),
  };
}

async function kill(w: Worker): Promise<void> {
  w.child.kill('SIGKILL');
  await w.exited;
}

function leftovers(keyDir: string): string[] {
  return fs.readdirSync(keyDir).filter((f) => f.includes('.tmp-') || f.endsWith('.lock'));
}

/** A child SIGKILLed inside a keyring write: temp copy written, lock held, rename not done. */
async function killHolderInsideWrite(keyDir: string, prefix: string, count: number) {
  const w = startWorker({ mode: 'hang-in-write', keyDir, region: REGION, prefix, count });
  await w.waitFor('holding');
  await kill(w);
}

describe('tenants/ data plane: local keyring after crashes (SIGKILL)', () => {
  let dir: string;
  let keyDir: string;
  let lockFile: string;
  beforeEach(() => {
    dir = tmpDir();
    keyDir = path.join(dir, 'keys');
    lockFile = `${keyringPath(keyDir, REGION)}.lock`;
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('leaves no temp copy of any key once reopened after SIGKILLs mid-write, so a shred is complete', async function () {
    this.timeout(120_000);
    for (let round = 0; round < 3; round++) {
      const w = startWorker({ mode: 'loop', keyDir, region: REGION, prefix: `r${round}x` });
      await w.waitFor('ready');
      await new Promise((r) => setTimeout(r, 50 + Math.floor(Math.random() * 300)));
      await kill(w);
    }
    await killHolderInsideWrite(keyDir, 'h', 5);
    expect(fs.readdirSync(keyDir).some((f) => f.includes('.tmp-'))).to.equal(true);
    const shredded = JSON.parse(fs.readFileSync(keyringPath(keyDir, REGION), 'utf8')).tenants.h0.jwk
      .k as string;

    const started = Date.now();
    const kp = await createLocalKeyProvider({ keyDir, region: REGION });
    expect(leftovers(keyDir)).to.deep.equal([]);
    expect(await kp.createTenantKey('after-crash')).to.equal('created');
    expect(Date.now() - started).to.be.below(5_000);

    expect(await kp.destroyTenantKey('h0')).to.equal(true);
    for (const f of fs.readdirSync(keyDir)) {
      expect(fs.readFileSync(path.join(keyDir, f), 'utf8'), f).to.not.include(shredded);
    }
  });

  it('removes its temp file when writing the keyring fails, and fails as the provider', async () => {
    const kp = await createLocalKeyProvider({ keyDir, region: REGION });
    const fsw = fs as { renameSync: typeof fs.renameSync };
    const renameSync = fs.renameSync;
    fsw.renameSync = (from, to) => {
      if (String(from).includes('.tmp-')) {
        throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
      }
      renameSync(from, to);
    };
    let err: Error;
    try {
      err = await rejection(kp.createTenantKey('acme'));
    } finally {
      fsw.renameSync = renameSync;
    }
    expect(leftovers(keyDir)).to.deep.equal([]);
    expect(asInstance(err, KeyUnavailableError).reason).to.equal('provider');
    expect(await kp.hasTenantKey('acme')).to.equal(false);
    expect(await kp.createTenantKey('acme')).to.equal('created');
  });

  const staleLocks: Array<[string, () => string]> = [
    [
      'names this process, which does not hold it (a restarted container got the same pid)',
      () => String(process.pid),
    ],
    ['is empty (its holder was killed between open and write)', () => ''],
  ];
  for (const [name, content] of staleLocks) {
    it(`does not wait for a lock file that ${name}`, async () => {
      const kp = await createLocalKeyProvider({ keyDir, region: REGION });
      fs.writeFileSync(lockFile, content(), { mode: 0o600 });
      const old = new Date(Date.now() - 60_000);
      fs.utimesSync(lockFile, old, old);
      const started = Date.now();
      expect(await kp.createTenantKey('acme')).to.equal('created');
      expect(await kp.rotateKek()).to.deep.equal({ primary: 2, retiring: [1] });
      expect(await kp.destroyTenantKey('acme')).to.equal(true);
      expect(Date.now() - started).to.be.below(3_000);
      expect(leftovers(keyDir)).to.deep.equal([]);
    });
  }

  it('two processes meeting one stale lock take turns: one holder at a time, both finish, no update lost', async function () {
    this.timeout(120_000);
    await createLocalKeyProvider({ keyDir, region: REGION });
    // The worst a crash leaves: a holder killed inside its write, its lock file empty.
    await killHolderInsideWrite(keyDir, 'h', 3);
    fs.writeFileSync(lockFile, '', { mode: 0o600 });
    const old = new Date(Date.now() - 60_000);
    fs.utimesSync(lockFile, old, old);

    const count = 12;
    const goFile = path.join(dir, 'go');
    const workers = ['a', 'b'].map((prefix) =>
      startWorker({ mode: 'contend', keyDir, region: REGION, prefix, count, holdMs: 15, goFile }),
    );
    await Promise.all(workers.map((w) => w.waitFor('waiting')));
    fs.writeFileSync(goFile, '');
    const codes = await Promise.all(workers.map((w) => w.exited));
    expect(codes, workers.map((w) => w.lines.join(' | ')).join('\n')).to.deep.equal([0, 0]);

    const times = (w: Worker, tag: string) =>
      w.lines.filter((l) => l.startsWith(`${tag} `)).map((l) => Number(l.slice(tag.length + 1)));
    // Both were at it together (so one waited for the other), not one after the other.
    const starts = workers.map((w) => times(w, 'start')[0] ?? NaN);
    const lastExits = workers.map((w) => Math.max(...times(w, 'exit')));
    expect(Math.max(...starts)).to.be.below(Math.min(...lastExits));
    const spans = workers.flatMap((w) => {
      const [enters, exits] = [times(w, 'enter'), times(w, 'exit')];
      expect(enters).to.have.length(count);
      expect(exits).to.have.length(count);
      return enters.map((start, i) => ({ start, end: exits[i] ?? NaN }));
    });
    spans.sort((x, y) => x.start - y.start);
    for (let i = 1; i < spans.length; i++) {
      const [prev, cur] = [spans[i - 1], spans[i]];
      expect(cur?.start, 'two holders at once').to.be.greaterThan(prev?.end ?? Infinity);
    }

    const kp = await createLocalKeyProvider({ keyDir, region: REGION });
    const expected = ['h0', 'h1', 'h2'].concat(
      ...['a', 'b'].map((p) => Array.from({ length: count }, (_, i) => `${p}${i}`)),
    );
    for (const t of expected) {
      expect(await kp.hasTenantKey(t), t).to.equal(true);
    }
    expect((await kp.describe()).tenantKeys).to.equal(expected.length);
    expect(leftovers(keyDir)).to.deep.equal([]);
  });
});
