/**
 * /readyz as an on-call engineer needs it (on-call review, findings A and B): a cheap probe that
 * never reads every tenant, a reason per part that is down, one log line per change of a part,
 * the `cellcds_ready{part}` gauge, and Redis (the replay cache) as a part when configured.
 * Real app over supertest, real SQLite, a real Redis behind a throwaway TCP proxy.
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp } from '../helpers/test-app.ts';
import type { TestApp } from '../helpers/test-app.ts';
import { startTcpProxy } from '../tenants/data-plane/tcp-proxy.ts';
import type { TcpProxy } from '../tenants/data-plane/tcp-proxy.ts';

const REDIS_URL = process.env.CELLCDS_TEST_REDIS_URL;

/** The parsed log lines whose message is `msg`. */
function logged(t: TestApp, msg: string): Array<Record<string, unknown>> {
  return t.logLines
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => l.msg === msg);
}

/** The value of `cellcds_ready{part}` in a scrape, or undefined. */
async function readyGauge(t: TestApp, part: string): Promise<number | undefined> {
  const text = (await request(t.app).get('/metrics')).text;
  const line = text
    .split('\n')
    .find((l) => l.startsWith('cellcds_ready{') && l.includes(`part="${part}"`));
  return line === undefined ? undefined : Number(line.split(' ').pop());
}

describe('server: /readyz probes cheaply and says why a part is down', function () {
  this.timeout(60_000);
  let t: TestApp;

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
  });
  after(async () => {
    await t.close();
  });

  it('never lists the tenants: a control plane whose list() throws is still ready', async () => {
    const tenants = t.deps.controlPlane.tenants;
    const list = tenants.list.bind(tenants);
    let calls = 0;
    tenants.list = () => {
      calls += 1;
      return Promise.reject(new Error('list() must not be called by /readyz'));
    };
    try {
      const res = await request(t.app).get('/readyz');
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      expect(res.body).to.include({ ready: true, controlPlane: 'ok', dataPlane: 'ok' });
      expect(res.body).to.not.have.property('reasons');
      expect(calls).to.equal(0);
    } finally {
      tenants.list = list;
    }
    expect(await readyGauge(t, 'controlPlane')).to.equal(1);
    expect(await readyGauge(t, 'dataPlane')).to.equal(1);
  });

  it("says why the data plane is down (its folder takes no write), logs it once, and when it's back", async () => {
    // The region's folder replaced by a file: the write probe fails with a real ENOTDIR.
    const regionDir = path.join(t.dataDir, 'local');
    const aside = `${regionDir}.aside`;
    fs.renameSync(regionDir, aside);
    fs.writeFileSync(regionDir, 'not a folder');
    try {
      // A successful write probe is trusted for 2 s (probes stay cheap): then it fails.
      const deadline = Date.now() + 5_000;
      while ((await request(t.app).get('/readyz')).status === 200 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 200));
      }
      for (let i = 0; i < 3; i++) {
        const res = await request(t.app).get('/readyz');
        expect(res.status).to.equal(503);
        expect(res.body).to.include({ ready: false, dataPlane: 'down', controlPlane: 'ok' });
        expect(res.body.reasons.dataPlane).to.deep.equal({
          code: 'ENOTDIR',
          message: 'data folder not writable (ENOTDIR)',
        });
        expect(JSON.stringify(res.body.reasons)).to.not.include(t.dataDir);
      }
      expect(await readyGauge(t, 'dataPlane')).to.equal(0);
    } finally {
      fs.rmSync(regionDir);
      fs.renameSync(aside, regionDir);
    }
    expect((await request(t.app).get('/readyz')).status).to.equal(200);
    expect(await readyGauge(t, 'dataPlane')).to.equal(1);
    const down = logged(t, 'readiness: part is down');
    expect(down, 'one warning for the whole outage').to.have.length(1);
    expect(down[0]).to.include({ level: 'warn', part: 'dataPlane', code: 'ENOTDIR' });
    const up = logged(t, 'readiness: part is back up');
    expect(up).to.have.length(1);
    expect(up[0]).to.include({ level: 'info', part: 'dataPlane' });
  });

  it('reports the control plane down when its database does not answer', async () => {
    const other = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    try {
      await other.deps.controlPlane.close();
      const res = await request(other.app).get('/readyz');
      expect(res.status).to.equal(503);
      expect(res.body).to.include({ ready: false, controlPlane: 'down' });
      expect(res.body.reasons.controlPlane.message).to.equal(
        'the control-plane database does not answer',
      );
      expect(res.body.reasons.controlPlane.code).to.be.a('string');
      expect(logged(other, 'readiness: part is down')[0]).to.include({ part: 'controlPlane' });
      expect(await readyGauge(other, 'controlPlane')).to.equal(0);
    } finally {
      other.deps.controlPlane.close = () => Promise.resolve();
      await other.close();
    }
  });
});

(REDIS_URL ? describe : describe.skip)('server: /readyz and the replay cache [redis]', function () {
  this.timeout(60_000);
  let proxy: TcpProxy;
  let t: TestApp;

  before(async () => {
    proxy = await startTcpProxy(REDIS_URL ?? '');
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false', CELLCDS_REDIS_URL: proxy.url });
  });
  after(async () => {
    proxy.maxConns = Number.POSITIVE_INFINITY;
    await t.close();
    await proxy.close();
  });

  it('is a part of readiness while Redis answers', async () => {
    const res = await request(t.app).get('/readyz');
    expect(res.status).to.equal(200);
    expect(res.body).to.include({ ready: true, replayCache: 'ok' });
    expect(await readyGauge(t, 'replayCache')).to.equal(1);
  });

  it('takes the plane out of rotation while Redis does not answer, and back when it does', async () => {
    proxy.maxConns = 0;
    proxy.dropAll();
    const res = await request(t.app).get('/readyz');
    expect(res.status).to.equal(503);
    expect(res.body).to.include({ ready: false, replayCache: 'down', dataPlane: 'ok' });
    expect(res.body.reasons.replayCache).to.deep.equal({
      code: 'unreachable',
      message: 'Redis does not answer',
    });
    expect(JSON.stringify(res.body)).to.not.include('127.0.0.1');
    expect(await readyGauge(t, 'replayCache')).to.equal(0);
    expect(logged(t, 'readiness: part is down')[0]).to.include({ part: 'replayCache' });
    proxy.maxConns = Number.POSITIVE_INFINITY;
    const deadline = Date.now() + 20_000;
    let back = await request(t.app).get('/readyz');
    while (back.status !== 200 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      back = await request(t.app).get('/readyz');
    }
    expect(back.status, JSON.stringify(back.body)).to.equal(200);
    expect(logged(t, 'readiness: part is back up')[0]).to.include({ part: 'replayCache' });
  });
});
