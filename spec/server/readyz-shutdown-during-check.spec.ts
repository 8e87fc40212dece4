import { expect } from 'chai';
import request from 'supertest';
import { createApp } from '../../server/app.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

/**
 * /readyz checks its parts (a control-plane ping, the key provider, a data-plane write and
 * fsync) before it answers. A SIGTERM arriving while those checks ran used to get a 200 out
 * after the shutdown had begun: a load balancer kept the plane in rotation (seen as a 200 probe
 * after the signal in shutdown.spec under load).
 */
describe('/readyz when the shutdown begins during its checks', function () {
  this.timeout(60_000);
  let t: TestApp;
  before(async () => {
    t = await buildTestApp();
  });
  after(async () => {
    await t.close();
  });

  it('answers 503 shuttingDown, not 200', async () => {
    const lifecycle = { shuttingDown: false };
    const stores = Object.create(t.deps.stores) as typeof t.deps.stores;
    // The signal lands while the data plane's check runs.
    stores.ping = async () => {
      const result = await t.deps.stores.ping();
      lifecycle.shuttingDown = true;
      return result;
    };
    const app = createApp({ ...t.deps, stores, lifecycle });
    const res = await request(app).get('/readyz');
    expect(res.status).to.equal(503);
    expect(res.body).to.include({ ready: false, shuttingDown: true });
  });

  it('still answers 200 when nothing changed during the checks', async () => {
    const app = createApp({ ...t.deps, lifecycle: { shuttingDown: false } });
    expect((await request(app).get('/readyz')).status).to.equal(200);
  });
});
