/**
 * A small local FHIR server standing in for an EHR's: an Express app on 127.0.0.1 port 0
 * serving one Synthea patient from spec/fixtures/synthea-r4/ through readPatientBundle +
 * searchRecord. Reads (`Type/id`) and searches (`Type?params`) with `_count`/`_page` paging and
 * absolute `next` links; a bearer token is required (401 otherwise). Every request is recorded
 * (so specs can assert that none was made), and the behaviour can be changed between calls:
 * delay, oversize bodies (with or without Content-Length), redirects, HTTP errors, custom
 * answers.
 */
import fs from 'node:fs';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import express from 'express';
import type { Request, Response } from 'express';
import { readPatientBundle, searchRecord } from '../../rules/index.ts';
import type { PatientRecord } from '../../rules/index.ts';

export const SYNTHEA_DIR = path.join(import.meta.dirname, '..', 'fixtures', 'synthea-r4');
/** The smallest saved Synthea patient (48 Observations, 1 active Condition). */
export const DEFAULT_PATIENT_FILE = 'Clemente_Kreiger_1484a42d-0eaf-4654-9cbf-6b050a5cd73b.json';

export interface RecordedRequest {
  method: string;
  /** Path and query, e.g. `/fhir/Observation?patient=1&_count=10`. */
  url: string;
  authorization: string | undefined;
  accept: string | undefined;
}

export interface FhirServerBehaviour {
  /** Wait this long before answering. */
  delayMs: number;
  /** Answer every request with a JSON body of this many bytes. */
  oversizeBytes?: number;
  /** With oversizeBytes: send Content-Length (true) or stream chunked without it (false). */
  declareLength: boolean;
  /** Answer every request with a 302 to this URL. */
  redirectTo?: string;
  /** Answer every request with this HTTP status and an OperationOutcome. */
  failStatus?: number;
  /** Custom answer; return undefined to fall through to the normal handling. */
  respond?: (url: URL) => { status: number; body: unknown } | undefined;
}

export interface TestFhirServer {
  /** `http://127.0.0.1:<port>/fhir` */
  baseUrl: string;
  origin: string;
  record: PatientRecord;
  token: string;
  requests: RecordedRequest[];
  behaviour: FhirServerBehaviour;
  close(): Promise<void>;
}

const patientCache = new Map<string, PatientRecord>();

/** Reads (once per process) a Synthea patient from spec/fixtures/synthea-r4/. */
export function loadSyntheaPatient(file = DEFAULT_PATIENT_FILE): PatientRecord {
  let record = patientCache.get(file);
  if (record === undefined) {
    record = readPatientBundle(JSON.parse(fs.readFileSync(path.join(SYNTHEA_DIR, file), 'utf8')));
    patientCache.set(file, record);
  }
  return structuredClone(record);
}

function operationOutcome(code: string, diagnostics: string): unknown {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics }] };
}

export async function startFhirServer(
  opts: { token?: string; patientFile?: string; basePath?: string } = {},
): Promise<TestFhirServer> {
  const record = loadSyntheaPatient(opts.patientFile);
  const token = opts.token ?? 'local-fhir-token-0123456789';
  const basePath = opts.basePath ?? '/fhir';
  const requests: RecordedRequest[] = [];
  const behaviour: FhirServerBehaviour = { delayMs: 0, declareLength: true };
  let baseUrl = '';

  const app = express();
  app.disable('x-powered-by');
  app.use((req: Request, _res: Response, next: () => void) => {
    requests.push({
      method: req.method,
      url: req.originalUrl,
      authorization: req.get('authorization'),
      accept: req.get('accept'),
    });
    next();
  });

  app.use(basePath, async (req: Request, res: Response) => {
    const send = (status: number, body: unknown): void => {
      res.status(status).type('application/fhir+json').send(JSON.stringify(body));
    };
    if (behaviour.delayMs > 0) {
      await sleep(behaviour.delayMs);
    }
    if (req.get('authorization') !== `Bearer ${token}`) {
      res.set('WWW-Authenticate', 'Bearer');
      send(401, operationOutcome('login', 'missing or wrong bearer token'));
      return;
    }
    if (behaviour.redirectTo !== undefined) {
      res.redirect(302, behaviour.redirectTo);
      return;
    }
    if (behaviour.failStatus !== undefined) {
      send(behaviour.failStatus, operationOutcome('exception', 'configured failure'));
      return;
    }
    if (behaviour.oversizeBytes !== undefined) {
      sendOversize(res, behaviour.oversizeBytes, behaviour.declareLength);
      return;
    }
    const url = new URL(req.originalUrl, 'http://127.0.0.1');
    const custom = behaviour.respond?.(url);
    if (custom !== undefined) {
      send(custom.status, custom.body);
      return;
    }
    const parts = req.path.split('/').filter((p) => p !== '');
    const [type, id] = parts;
    if (type === undefined || parts.length > 2) {
      send(400, operationOutcome('not-supported', 'only reads and type searches'));
      return;
    }
    if (id !== undefined) {
      const resource = record.resources.find((r) => r.resourceType === type && r.id === id);
      if (resource === undefined) {
        send(404, operationOutcome('not-found', 'no such resource'));
        return;
      }
      send(200, resource);
      return;
    }
    const query = new URLSearchParams(url.search);
    const matches = searchRecord(record, type, query);
    const count = Number(query.get('_count') ?? matches.length) || matches.length || 1;
    const page = Math.max(1, Number(query.get('_page') ?? '1'));
    const slice = matches.slice((page - 1) * count, page * count);
    const self = `${baseUrl}/${type}?${query.toString()}`;
    const links: Array<{ relation: string; url: string }> = [{ relation: 'self', url: self }];
    if (page * count < matches.length) {
      const nextQuery = new URLSearchParams(query);
      nextQuery.set('_page', String(page + 1));
      links.push({ relation: 'next', url: `${baseUrl}/${type}?${nextQuery.toString()}` });
    }
    send(200, {
      resourceType: 'Bundle',
      type: 'searchset',
      total: matches.length,
      link: links,
      entry: slice.map((resource) => ({
        fullUrl: `${baseUrl}/${String(resource.resourceType)}/${String(resource.id)}`,
        resource,
        search: { mode: 'match' },
      })),
    });
  });

  const server = app.listen(0, '127.0.0.1');
  await new Promise<void>((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
  const { port } = server.address() as AddressInfo;
  const origin = `http://127.0.0.1:${port}`;
  baseUrl = `${origin}${basePath}`;
  return {
    baseUrl,
    origin,
    record,
    token,
    requests,
    behaviour,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) =>
        server.close(() => {
          resolve();
        }),
      );
    },
  };
}

function sendOversize(res: Response, bytes: number, declareLength: boolean): void {
  const head = '{"resourceType":"Binary","data":"';
  const tail = '"}';
  const fill = Math.max(0, bytes - head.length - tail.length);
  res.status(200).type('application/fhir+json');
  if (declareLength) {
    res.send(head + 'A'.repeat(fill) + tail);
    return;
  }
  // Chunked: no Content-Length, so the client must count while streaming.
  res.write(head);
  const chunk = 'A'.repeat(16 * 1024);
  let left = fill;
  const pump = (): void => {
    while (left > 0) {
      const n = Math.min(left, chunk.length);
      left -= n;
      if (!res.write(chunk.slice(0, n))) {
        res.once('drain', pump);
        return;
      }
    }
    res.end(tail);
  };
  res.once('error', () => undefined);
  pump();
}
