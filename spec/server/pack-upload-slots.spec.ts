/**
 * Pack uploads a process takes at once: each holds a check worker and then the tests' evaluator
 * for up to tens of seconds and up to 4 MB of body, and they used to queue without bound (12
 * concurrent 3 MB uploads were all read into memory and answered one after another, the last
 * after 30 s). Now a third concurrent upload is refused before its body is read: 503 with
 * Retry-After, logged as a warning, and the slot frees when an upload ends, even by the
 * client hanging up.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { slowPack } from '../helpers/slow-pack.ts';

describe('pack uploads: a bounded number at once per process', function () {
  this.timeout(60_000);
  let t: TestApp;
  let server: http.Server;
  let port: number;

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    server = http.createServer(t.app);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as AddressInfo).port;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
    await t.close();
  });

  /** An upload whose body has not finished arriving: it holds a slot until destroyed. */
  function slowUpload(): Promise<http.ClientRequest> {
    return new Promise((resolve, reject) => {
      const req = http.request({
        host: '127.0.0.1',
        port,
        method: 'POST',
        path: '/admin/rule-packs',
        headers: {
          authorization: `Bearer ${t.adminToken}`,
          'content-type': 'application/json',
          'content-length': '100000',
        },
      });
      req.on('error', () => undefined);
      req.write('{"id":', () => {
        resolve(req);
      });
      req.on('response', (res) => {
        reject(new Error(`answered early: ${res.statusCode}`));
      });
    });
  }

  const upload = (id: string) =>
    request(server)
      .post('/admin/rule-packs')
      .set('authorization', `Bearer ${t.adminToken}`)
      .send(slowPack(0, 1, id));

  it('refuses upload 3 with 503 + Retry-After while 2 (the default) are in progress, and takes uploads again once they end', async () => {
    expect(t.deps.config.packCheck.uploadsInFlight).to.equal(2);
    const held: http.ClientRequest[] = [];
    for (let i = 0; i < 2; i++) {
      held.push(await slowUpload());
    }
    // The held requests reach the route (headers read) before the next one is sent.
    let refused: request.Response | undefined;
    for (let attempt = 0; attempt < 50; attempt++) {
      const res = await upload('slots-refused');
      if (res.status === 503) {
        refused = res;
        break;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(refused, 'no 503 while the slots were held').to.not.equal(undefined);
    expect(refused!.headers['retry-after']).to.equal('10');
    expect(refused!.body).to.include({ error: 'unavailable' });
    expect(refused!.body.message).to.match(/pack uploads are already being checked/);
    expect((await t.deps.controlPlane.packs.versions('slots-refused')).length).to.equal(0);

    // One client hangs up: its slot frees.
    held[0]!.destroy();
    let ok: request.Response | undefined;
    for (let attempt = 0; attempt < 100; attempt++) {
      const res = await upload('slots-after');
      if (res.status !== 503) {
        ok = res;
        break;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(ok?.status, JSON.stringify(ok?.body)).to.equal(201);
    for (const r of held) {
      r.destroy();
    }
  });
});
