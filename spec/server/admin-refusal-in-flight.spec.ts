/**
 * A token revoked while its request is in flight does not complete that request: the token is
 * checked again once the body is read, before the action runs (401, nothing changed, nothing
 * audited as done by the revoked token).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack } from '../helpers/packs.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

const PORT = 18501;

describe('server/ a token revoked while its request is in flight', () => {
  let t: TestApp;
  let server: http.Server;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('alpha'))).status).to.equal(201);
    await t.addTenant('hosp-a');
    server = await new Promise<http.Server>((resolve, reject) => {
      const s = t.app.listen(PORT, '127.0.0.1', () => {
        resolve(s);
      });
      s.once('error', reject);
    });
  });
  after(async () => {
    await new Promise<void>((resolve) =>
      server.close(() => {
        resolve();
      }),
    );
    await t.close();
  });

  /** Resolves once the repository has been asked about `token` (the first check). */
  const checked = (token: string): Promise<void> => {
    const repo = t.deps.controlPlane.adminTokens as unknown as Record<
      string,
      ((given: string) => Promise<unknown>) | undefined
    >;
    return new Promise((resolve) => {
      for (const name of ['authenticate', 'check']) {
        const original = repo[name];
        if (typeof original !== 'function') {
          continue;
        }
        repo[name] = async (given: string) => {
          const result = await original.call(repo, given);
          if (given === token) {
            repo[name] = original;
            resolve();
          }
          return result;
        };
      }
    });
  };

  /** Sends the headers now, the body once `send` is called; resolves with status and body. */
  const slowPut = (path: string, token: string, body: string) => {
    const req = http.request({
      host: '127.0.0.1',
      port: (server.address() as AddressInfo).port,
      method: 'PUT',
      path,
      headers: {
        authorization: `Bearer ${token}`,
        'content-type': 'application/json',
        'content-length': Buffer.byteLength(body),
      },
    });
    const answer = new Promise<{ status: number; body: string }>((resolve, reject) => {
      req.on('response', (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => {
          resolve({ status: res.statusCode ?? 0, body: text });
        });
      });
      req.on('error', reject);
    });
    req.flushHeaders();
    return { send: () => req.end(body), answer };
  };

  it('refuses a PUT subscriptions whose body arrives after the revocation (401, unchanged)', async () => {
    const issued = await op(request(t.app).post('/admin/tokens')).send({
      role: 'tenant-admin',
      tenant: 'hosp-a',
    });
    expect(issued.status).to.equal(201);
    const { id, token } = issued.body as { id: string; token: string };

    const firstCheck = checked(token);
    const put = slowPut(
      '/admin/tenants/hosp-a/subscriptions',
      token,
      JSON.stringify([{ pack: 'alpha', version: '1.0.0' }]),
    );
    await firstCheck; // authenticated on its headers
    expect((await op(request(t.app).delete(`/admin/tokens/${id}`))).status).to.equal(204);
    put.send();
    const res = await put.answer;
    expect(res.status).to.equal(401);
    expect(JSON.parse(res.body)).to.include({ error: 'invalid_token' });

    const tenant = await op(request(t.app).get('/admin/tenants/hosp-a'));
    expect(tenant.body.subscriptions).to.deep.equal([]);
    const done = await t.deps.controlPlane.audit.list({ type: 'admin.tenant.subscriptions' });
    expect(done.filter((e) => e.actor === `tenant-admin:${id}`)).to.deep.equal([]);
    // The refusal is audited (admin.auth failure), as a token refused on arrival is.
    await t.deps.failureAudit.flush();
    const refused = await t.deps.controlPlane.audit.list({ type: 'admin.auth' });
    expect(
      refused.some(
        (e) => e.outcome === 'failure' && e.detail?.endpoint === '/admin/tenants/:id/subscriptions',
      ),
    ).to.equal(true);
  });

  it('does not store a pack whose uploader was revoked while it was being validated (401)', async () => {
    const issued = await op(request(t.app).post('/admin/tokens')).send({ role: 'rule-author' });
    expect(issued.status).to.equal(201);
    const { id, token } = issued.body as { id: string; token: string };
    // The token passes on arrival and again once the body is read; it is revoked right after
    // that second check, while the pack is validated and its tests run.
    const repo = t.deps.controlPlane.adminTokens;
    const original = repo.check.bind(repo);
    let checks = 0;
    repo.check = async (given: string) => {
      const result = await original(given);
      if (given === token && ++checks === 2) {
        await repo.revoke(id);
      }
      return result;
    };
    try {
      const res = await request(t.app)
        .post('/admin/rule-packs')
        .set('authorization', `Bearer ${token}`)
        .send(tinyPack('revoked-during-check'));
      expect(res.status).to.equal(401);
      expect(res.body).to.include({ error: 'invalid_token' });
    } finally {
      repo.check = original;
    }
    expect(checks).to.be.greaterThan(2);
    const packs = await op(request(t.app).get('/admin/rule-packs'));
    expect((packs.body as { packs: Array<{ id: string }> }).packs.map((p) => p.id)).to.not.include(
      'revoked-during-check',
    );
    const uploads = await t.deps.controlPlane.audit.list({ type: 'admin.pack.upload' });
    expect(uploads.filter((e) => e.actor === `rule-author:${id}`)).to.deep.equal([]);
  });

  it('still serves a PUT whose token stays valid', async () => {
    const issued = await op(request(t.app).post('/admin/tokens')).send({
      role: 'tenant-admin',
      tenant: 'hosp-a',
    });
    const { token } = issued.body as { token: string };
    const firstCheck = checked(token);
    const put = slowPut(
      '/admin/tenants/hosp-a/subscriptions',
      token,
      JSON.stringify([{ pack: 'alpha', version: '1.0.0' }]),
    );
    await firstCheck;
    put.send();
    const res = await put.answer;
    expect(res.status).to.equal(200);
    expect(JSON.parse(res.body).subscriptions).to.deep.equal([{ pack: 'alpha', version: '1.0.0' }]);
  });
});
