import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { forEachBackend, invocation, makeEnv } from './helpers.ts';
import type { Env } from './helpers.ts';

const WORKER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'child', 'store-worker.ts');
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

interface Worker {
  child: ChildProcess;
  /** Resolves with the first stdout line matching `pred` (rejects if the child exits first). */
  waitFor(pred: (line: string) => boolean): Promise<string>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr(): string;
}

function startWorker(args: object): Worker {
  const child = spawn(process.execPath, ['--import', 'tsx', WORKER, JSON.stringify(args)], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  const waiters: Array<{
    pred: (l: string) => boolean;
    resolve: (l: string) => void;
    reject: (e: Error) => void;
  }> = [];
  let buffered = '';
  let err = '';
  child.stderr.on('data', (d: Buffer) => {
    err += d.toString('utf8');
  });
  child.stdout.on('data', (d: Buffer) => {
    buffered += d.toString('utf8');
    let i = buffered.indexOf('\n');
    while (i >= 0) {
      const line = buffered.slice(0, i);
      buffered = buffered.slice(i + 1);
      lines.push(line);
      for (const w of [...waiters]) {
        if (w.pred(line)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
      i = buffered.indexOf('\n');
    }
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => {
      for (const w of waiters.splice(0)) {
        w.reject(
          new Error(`worker exited (${code ?? signal}) before the expected line; stderr: ${err}`),
        );
      }
      resolve({ code, signal });
    });
  });
  return {
    child,
    exited,
    stderr: () => err,
    waitFor(pred) {
      const hit = lines.find(pred);
      if (hit !== undefined) {
        return Promise.resolve(hit);
      }
      return new Promise((resolve, reject) => waiters.push({ pred, resolve, reject }));
    },
  };
}

const progressAtLeast = (n: number) => (line: string) => {
  const m = /^progress (\d+) /.exec(line);
  return m !== null && Number(m[1]) >= n;
};

forEachBackend('tenants/ data plane: crash safety (SIGKILL)', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
  });
  afterEach(async () => {
    await env.close();
  });

  it('keeps an acknowledged saveInvocation after the process is SIGKILLed', async function () {
    this.timeout(60_000);
    await env.stores.close();
    for (const id of ['acked-1', 'acked-2', 'acked-3']) {
      const w = startWorker({ mode: 'save', env: env.childOptions(), tenant: 'acme', id });
      await w.waitFor((l) => l === `ack ${id}`);
      w.child.kill('SIGKILL');
      expect((await w.exited).signal).to.equal('SIGKILL');
    }
    const stores = await env.reopen();
    for (const id of ['acked-1', 'acked-2', 'acked-3']) {
      const rec = await stores.store('acme').readInvocation(id);
      expect(rec.secret.context).to.deep.equal({
        patientId: `ACK${id}-patient`,
        userId: 'Practitioner/1',
      });
    }
    expect(await stores.store('acme').audit.verify()).to.include({ ok: true });
  });

  it('a rewrap job SIGKILLed mid-way resumes, finishes, and counts every record exactly once', async function () {
    this.timeout(240_000);
    const N = 2000;
    const s = env.stores.store('acme');
    for (let i = 1; i <= N; i += 50) {
      await Promise.all(
        Array.from({ length: Math.min(50, N - i + 1) }, (_, k) =>
          s.saveInvocation(invocation(`inv-${i + k}`, `c${i + k}`)),
        ),
      );
    }
    await s.saveFeedback(
      Array.from({ length: 40 }, (_, k) => ({
        card: `card-inv-${k + 1}`,
        outcome: 'accepted' as const,
        outcomeTimestamp: '2025-01-01T13:00:00Z',
      })),
      { service: 'med-safety' },
    );
    // Rotate in a process that stops at once: the job row is left `running` for the children.
    const starter = await env.reopen({ rewrap: { batchSize: 25, throttleMs: 60_000 } });
    const job = await starter.store('acme').keys.rotate();
    expect(job.total).to.equal(N + 40);
    await starter.close();
    await env.stores.close();

    const kills: number[] = [];
    for (const killAt of [300, 700, 1100, 1500]) {
      const w = startWorker({
        mode: 'rewrap',
        env: env.childOptions(),
        tenant: 'acme',
        jobId: job.id,
        batchSize: 25,
        // The next worker resumes once the killed one's lease has expired (job-lease.ts).
        jobLeaseMs: 500,
      });
      const line = await w.waitFor(progressAtLeast(killAt));
      w.child.kill('SIGKILL');
      expect((await w.exited).signal).to.equal('SIGKILL');
      kills.push(Number(line.split(' ')[1]));
    }
    const last = startWorker({
      mode: 'rewrap',
      env: env.childOptions(),
      tenant: 'acme',
      jobId: job.id,
      batchSize: 25,
      jobLeaseMs: 500,
    });
    const final = await last.waitFor((l) => l.startsWith('final '));
    expect((await last.exited).code, last.stderr()).to.equal(0);
    const info = JSON.parse(final.slice('final '.length));
    expect(info).to.include({ id: job.id, status: 'done', done: N + 40, total: N + 40 });
    expect(kills[0]).to.be.lessThan(N);

    const stores = await env.reopen();
    const status = await stores.store('acme').keys.status();
    expect(status.versions.map((v) => [v.version, v.status, v.records])).to.deep.equal([
      [1, 'destroyed', 0],
      [2, 'primary', N + 40],
    ]);
    const all = await Promise.all(
      Array.from({ length: N }, (_, i) => stores.store('acme').readInvocation(`inv-${i + 1}`)),
    );
    all.forEach((rec, i) => {
      expect(rec.keyVersion).to.equal(2);
      expect(rec.secret.trace).to.deep.equal([{ rule: 'r1', matched: `c${i + 1}-trace` }]);
    });
    expect(all.slice(0, 40).every((r) => r.feedback.length === 1)).to.equal(true);
    const audit = stores.store('acme').audit;
    expect(await audit.verify()).to.include({ ok: true });
    const rewrapEvents = (await audit.list({ limit: 10_000 })).filter(
      (e) => e.type === 'key.rewrap',
    );
    expect(rewrapEvents.map((e) => e.detail)).to.deep.equal([
      { job: job.id, done: N + 40, total: N + 40, destroyed: '1' },
    ]);
  });
});
