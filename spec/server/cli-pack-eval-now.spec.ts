import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { runCli } from '../helpers/processes.ts';

/**
 * A rule comparing a draft authored at 10:00 UTC with %now: for a date-only now it must not
 * fire (the date is 00:00 UTC), for the next day it must. The pack's own tests say so.
 */
const PACK = `id: boundary
version: 1.0.0
title: t
publisher: p
description: d
services:
  - id: sign
    hook: order-sign
    description: d
rules:
  - id: authored-by-now
    service: sign
    when: '%draftOrders.entry.resource.ofType(MedicationRequest).where(authoredOn <= %now).exists()'
    card: { summary: Authored by now, indicator: info, source: { label: x } }
tests:
  - name: the day itself is 00:00 UTC
    service: sign
    now: '2021-03-01'
    requestFile: request.json
    expect: { notFire: [authored-by-now] }
  - name: the next day
    service: sign
    now: '2021-03-02'
    requestFile: request.json
    expect: { fire: [authored-by-now] }
`;

const REQUEST = {
  hook: 'order-sign',
  context: {
    patientId: 'p',
    userId: 'Practitioner/u',
    draftOrders: {
      resourceType: 'Bundle',
      type: 'collection',
      entry: [
        {
          resource: {
            resourceType: 'MedicationRequest',
            id: 'x',
            status: 'draft',
            intent: 'order',
            subject: { reference: 'Patient/p' },
            authoredOn: '2021-03-01T10:00:00Z',
            medicationCodeableConcept: { text: 'anything' },
          },
        },
      ],
    },
  },
  prefetch: {},
};

/** `pack eval --now DATE` reads a date as a pack test's `now` does: 00:00 UTC of that day. */
describe('cellcds CLI: pack eval --now with a date only', function () {
  this.timeout(120_000);
  let work: string;
  let packFile: string;
  let requestFile: string;

  const run = (args: string[]) =>
    runCli(args, {
      ...process.env,
      CELLCDS_DATA_DIR: path.join(work, 'data'),
      CELLCDS_LOG_LEVEL: 'silent',
    });
  const summaries = (now: string): string[] => {
    const r = run(['pack', 'eval', packFile, '--request', requestFile, '--now', now]);
    expect(r.status, r.stderr).to.equal(0);
    return (JSON.parse(r.stdout) as { cards: Array<{ summary: string }> }).cards.map(
      (c) => c.summary,
    );
  };

  before(() => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-eval-now-'));
    packFile = path.join(work, 'pack.yaml');
    requestFile = path.join(work, 'request.json');
    fs.writeFileSync(packFile, PACK);
    fs.writeFileSync(requestFile, JSON.stringify(REQUEST));
  });
  after(() => {
    fs.rmSync(work, { recursive: true, force: true });
  });

  it('pack test: the reference, a date-only now is 00:00 UTC of that day', () => {
    const r = run(['pack', 'test', packFile]);
    expect(r.status, r.stdout + r.stderr).to.equal(0);
    expect(r.stdout).to.include('2 passed, 0 failed');
  });

  it('pack eval --now 2021-03-01 answers as the test with that date did', () => {
    expect(summaries('2021-03-01')).to.deep.equal([]);
    expect(summaries('2021-03-02')).to.deep.equal(['Authored by now']);
  });

  it('pack eval --now still takes an instant with its offset', () => {
    expect(summaries('2021-03-01T10:00:00Z')).to.deep.equal(['Authored by now']);
    expect(summaries('2021-03-01T10:00:00+01:00')).to.deep.equal([]);
  });

  it('pack eval --now refuses a time without an offset as a test does (exit 2)', () => {
    const r = run([
      'pack',
      'eval',
      packFile,
      '--request',
      requestFile,
      '--now',
      '2021-03-01T10:00',
    ]);
    expect(r.status, r.stdout).to.equal(2);
    expect(r.stderr).to.include(
      'a time needs an offset (Z or +hh:mm), e.g. 2021-03-01T23:00:00Z; or give a date only',
    );
  });
});
