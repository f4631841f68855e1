// Nsight Compute's CSV (device-check.sh's "ncu" step: --csv --page details, one row per kernel launch and metric,
// after the profiled script's own lines) summed per kernel and grid: launches, total and mean duration, DRAM and
// SM throughput, achieved and theoretical occupancy, registers per thread, local-memory spills. A markdown table,
// longest total first, so that a device run's log says at once which kernels to look at.
//   node dist/benchmarks/ncu-summary.js ncu.log [--top N]
import * as fs from 'fs';
import { parse as parseCsv } from 'csv-parse/sync';

interface Launch {
  kernel: string;
  grid: string;
  block: string;
  metrics: Map<string, { unit: string; value: string }>;
}

export interface KernelSummary {
  kernel: string;  // the name without its argument list, namespaces and `void`
  grid: string;
  block: string;
  launches: number;
  totalUs: number;
  meanUs: number;
  dramPct: number;
  smPct: number;
  achievedOccupancyPct: number;
  theoreticalOccupancyPct: number;
  registers: number;
  spillRequests: number;
}

const NS_PER_UNIT: Record<string, number> = { ns: 1, nsecond: 1, us: 1e3, usecond: 1e3, ms: 1e6, msecond: 1e6, s: 1e9, second: 1e9 };

/** A number as ncu prints it ("38,976", "3.45"); NaN when it is not one. */
function numberOf(text: string | undefined): number {
  return text === undefined ? NaN : Number(text.replace(/,/g, ''));
}

/** `void (anonymous namespace)::f<16, 1, float>(const T *, ...)` -> `f<16, 1, float>`. */
export function shortKernelName(name: string): string {
  // (ncu writes the anonymous namespace as "unnamed>::", "<unnamed>::" or "(anonymous namespace)::")
  const s = name.replace(/^void\s+/, '').replace(/(<unnamed>|unnamed>|\(anonymous namespace\))::/g, '');
  // the argument list starts at the first '(' outside template arguments that is not "(anonymous namespace)"
  let depth = 0;
  let cut = s.length;
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '<') depth++;
    else if (s[i] === '>' && depth > 0) depth--;
    else if (s[i] === '(' && depth === 0 && !s.startsWith('(anonymous namespace)', i)) {
      cut = i;
      break;
    }
  }
  return s.slice(0, cut).replace(/tfew::kernels::/g, '').trim();
}

/** The launches of an ncu CSV log (lines before its header are the profiled program's own). */
export function parseNcuLog(text: string): Launch[] {
  const lines = text.split('\n');
  const header = lines.findIndex((l) => l.startsWith('"ID",'));
  if (header < 0) return [];
  const rows = parseCsv(lines.slice(header).filter((l) => l.startsWith('"')).join('\n'),
    { columns: true, relax_column_count: true, skip_empty_lines: true }) as Record<string, string>[];
  const byId = new Map<string, Launch>();
  for (const r of rows) {
    const id = r['ID'];
    if (id === undefined || r['Metric Name'] === undefined) continue;
    let launch = byId.get(id);
    if (!launch) {
      launch = { kernel: shortKernelName(r['Kernel Name'] ?? '?'), grid: r['Grid Size'] ?? '?', block: r['Block Size'] ?? '?', metrics: new Map() };
      byId.set(id, launch);
    }
    launch.metrics.set(r['Metric Name'], { unit: r['Metric Unit'] ?? '', value: r['Metric Value'] ?? '' });
  }
  return [...byId.values()];
}

/** Per kernel and grid, longest total duration first. */
export function summariseNcu(launches: Launch[]): KernelSummary[] {
  const groups = new Map<string, Launch[]>();
  for (const l of launches) {
    const key = `${l.kernel} ${l.grid} ${l.block}`;
    groups.set(key, [...(groups.get(key) ?? []), l]);
  }
  const mean = (xs: number[]) => {
    const ok = xs.filter((x) => Number.isFinite(x));
    return ok.length ? ok.reduce((a, b) => a + b, 0) / ok.length : NaN;
  };
  const out: KernelSummary[] = [];
  for (const ls of groups.values()) {
    const metric = (name: string) => ls.map((l) => numberOf(l.metrics.get(name)?.value));
    const durationsUs = ls.map((l) => {
      const d = l.metrics.get('Duration');
      return d ? numberOf(d.value) * (NS_PER_UNIT[d.unit] ?? NaN) / 1e3 : NaN;
    });
    const total = durationsUs.filter((x) => Number.isFinite(x)).reduce((a, b) => a + b, 0);
    out.push({
      kernel: ls[0].kernel, grid: ls[0].grid, block: ls[0].block, launches: ls.length,
      totalUs: total, meanUs: mean(durationsUs),
      dramPct: mean(metric('DRAM Throughput')), smPct: mean(metric('Compute (SM) Throughput')),
      achievedOccupancyPct: mean(metric('Achieved Occupancy')), theoreticalOccupancyPct: mean(metric('Theoretical Occupancy')),
      registers: mean(metric('Registers Per Thread')), spillRequests: mean(metric('Local Memory Spilling Requests')),
    });
  }
  return out.sort((a, b) => b.totalUs - a.totalUs);
}

export function ncuTable(summary: KernelSummary[], top = 40): string {
  const f = (x: number, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : '-');
  const rows = summary.slice(0, top).map((k) => `| ${k.kernel} | ${k.grid} x ${k.block} | ${k.launches} | ${f(k.totalUs)} | ${f(k.meanUs)} | ` +
    `${f(k.dramPct)} | ${f(k.smPct)} | ${f(k.achievedOccupancyPct)} / ${f(k.theoreticalOccupancyPct)} | ${f(k.registers, 0)} | ${f(k.spillRequests, 0)} |`);
  return ['| kernel | grid x block | launches | total us | mean us | DRAM % | SM % | occupancy % (achieved / theoretical) | registers | spill requests |',
    '|---|---|---|---|---|---|---|---|---|---|', ...rows].join('\n');
}

if (require.main === module) {
  const args = process.argv.slice(2);
  const file = args.find((a) => !a.startsWith('--'));
  const topAt = args.indexOf('--top');
  const top = topAt >= 0 ? Number(args[topAt + 1]) : 40;
  if (!file || !Number.isInteger(top) || top < 1) {
    console.error('usage: node dist/benchmarks/ncu-summary.js ncu.log [--top N]');
    process.exit(2);
  }
  const launches = parseNcuLog(fs.readFileSync(file, 'utf8'));
  if (launches.length === 0) {
    console.error(`${file}: no ncu CSV rows (no "ID" header line)`);
    process.exit(1);
  }
  console.log(`ncu: ${launches.length} kernel launches, durations summed per kernel and grid (Nsight Compute, clocks not locked)`);
  console.log(ncuTable(summariseNcu(launches), top));
}
