import { expect } from 'chai';
import request from 'supertest';
import YAML from 'yaml';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { tinyPack } from '../helpers/packs.ts';

/** What a rule author reads when the admin API refuses a pack (POST /admin/rule-packs). */
describe('admin API: messages for rule authors', () => {
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  before(async () => {
    t = await buildTestApp();
  });
  after(async () => t.close());

  it('a changed pack under a stored version: 409 naming id@version and the version to bump to', async () => {
    expect((await t.uploadPack(tinyPack('msg-p', '2.3.4'))).status).to.equal(201);
    const res = await t.uploadPack(tinyPack('msg-p', '2.3.4', 'Another summary'));
    expect(res.status).to.equal(409);
    expect(res.body.error).to.equal('conflict');
    expect(JSON.stringify(res.body)).to.contain(
      'msg-p@2.3.4 is already stored with different content; versions are immutable: bump \\"version\\" (e.g. to 2.3.5) and push again',
    );
  });

  it('a YAML body with an indented first key: the first few errors, the indent named, how many more', async () => {
    const text = YAML.stringify(tinyPack('msg-yaml'))
      .split('\n')
      .map((line, i) => (i === 0 ? `  ${line}` : line))
      .join('\n');
    const res = await op(request(t.app).post('/admin/rule-packs'))
      .set('content-type', 'application/yaml')
      .send(text);
    expect(res.status).to.equal(422);
    const problems = res.body.problems as Array<{ path: string; message: string }>;
    expect(problems.length).to.be.at.most(6);
    expect(problems[0]?.message).to.contain(
      'line 1 (the first key) is indented by 2 spaces: top-level keys start at column 1',
    );
  });

  it('a pack with file-based tests sent straight to the API: says to use pack push', async () => {
    const pack = tinyPack('msg-files');
    pack.tests = [
      {
        name: 'from a file',
        service: 'msg-files-order-sign',
        requestFile: 'request.json',
        expect: { fire: [(pack.rules as Array<{ id: string }>)[0]!.id] },
      },
    ];
    const res = await t.uploadPack(pack);
    expect(res.status).to.equal(422);
    expect(res.body.problems).to.deep.include({
      path: 'tests[0].requestFile',
      message:
        'a test file cannot be read in an upload (no base directory): push the pack with `npx cellcds pack push <file>`, which inlines test files, or give the test an inline request',
    });
  });
});
