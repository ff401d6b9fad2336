/* Viola MPI guest: a job shaped like NEMO3D (the VIOLIN paper's application), in two phases.
 *
 *   strain   network-heavy: every iteration each rank swaps its block with both ring
 *            neighbours (MPI_Sendrecv both ways) and mixes the three into its block;
 *   lanczos  CPU- and memory-heavy: each rank sweeps an array of MEM MiB built from its block,
 *            in a scattered order (most reads miss the cache), ITERS times; an MPI_Allreduce
 *            after each sweep gives the progress line its global sum.
 *
 * All arithmetic is on 64-bit integers, so the result is the same wherever the ranks run and
 * however they are moved: the final checksum (the ranks' array checksums summed) depends only
 * on the parameters and the number of ranks. --verify makes rank 0 compute it again alone,
 * rank by rank (one array at a time, so it needs no more memory than one rank), and compare.
 *
 *   mpiexec -n N /usr/local/bin/mpi-nemo [--strain-iters S] [--block-kib B]
 *                                        [--lanczos-iters L] [--mem-mib M] [--verify]
 *   defaults: S=50 B=256 L=4 M=64
 *
 * Rank 0 prints a line per iteration:
 *   nemo strain iter=I/S t=SECONDS          nemo lanczos iter=I/L sum=HEX t=SECONDS
 * and at the end (exit 0, or 1 when the verification fails):
 *   nemo ok ranks=N checksum=HEX strain_s=X lanczos_s=Y total_s=Z hosts=a,b [verify=ok]
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

static uint64_t mix(uint64_t own, uint64_t left, uint64_t right, uint64_t iter) {
  return splitmix(own ^ (left << 1) ^ (right >> 1) ^ iter);
}

/* The block of `rank` before the first strain iteration. */
static void block_init(uint64_t *u, size_t nb, int rank) {
  for (size_t i = 0; i < nb; i++) u[i] = splitmix(((uint64_t)rank << 40) + i);
}

/* One strain update of a block from its neighbours' blocks (all of the previous iteration). */
static void strain_step(uint64_t *next, const uint64_t *own, const uint64_t *left,
                        const uint64_t *right, size_t nb, uint64_t iter) {
  for (size_t i = 0; i < nb; i++) next[i] = mix(own[i], left[i], right[(i + 1) % nb], iter);
}

/* The array of `rank` from its final block. */
static void array_init(uint64_t *w, size_t nw, const uint64_t *u, size_t nb, int rank) {
  for (size_t i = 0; i < nw; i++) w[i] = u[i % nb] ^ splitmix(i + (uint64_t)rank);
}

/* One lanczos sweep; returns the array's sum after it. The read index strides by a large odd
 * number modulo the size: scattered reads, as in a sparse matrix-vector product. */
static uint64_t lanczos_sweep(uint64_t *w, size_t nw, uint64_t iter) {
  const uint64_t stride = 2654435761ULL % nw | 1;
  uint64_t sum = 0;
  size_t j = (size_t)(iter % nw);
  for (size_t i = 0; i < nw; i++) {
    w[i] = w[i] * 6364136223846793005ULL + (w[j] >> 7) + iter;
    sum += w[i];
    j += stride;
    if (j >= nw) j -= nw;
  }
  return sum;
}

static uint64_t array_checksum(const uint64_t *w, size_t nw) {
  uint64_t c = 0;
  for (size_t i = 0; i < nw; i++) c = splitmix(c ^ w[i]);
  return c;
}

static void *alloc_or_die(size_t bytes) {
  void *p = malloc(bytes);
  if (!p) {
    fprintf(stderr, "mpi-nemo: cannot allocate %zu bytes\n", bytes);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return p;
}

/* What the parallel run must have computed, by one process: the strain phase for all ranks
 * (their blocks are small), then each rank's lanczos phase in turn on one array. */
static uint64_t serial_checksum(int size, size_t nb, int strain_iters, size_t nw,
                                int lanczos_iters) {
  uint64_t *blocks = alloc_or_die((size_t)size * nb * sizeof(uint64_t));
  uint64_t *next = alloc_or_die((size_t)size * nb * sizeof(uint64_t));
  for (int r = 0; r < size; r++) block_init(blocks + (size_t)r * nb, nb, r);
  for (int t = 0; t < strain_iters; t++) {
    for (int r = 0; r < size; r++) {
      int prev = (r + size - 1) % size, nxt = (r + 1) % size;
      strain_step(next + (size_t)r * nb, blocks + (size_t)r * nb, blocks + (size_t)prev * nb,
                  blocks + (size_t)nxt * nb, nb, (uint64_t)t);
    }
    uint64_t *swap = blocks;
    blocks = next;
    next = swap;
  }
  free(next);
  uint64_t *w = alloc_or_die(nw * sizeof(uint64_t));
  uint64_t total = 0;
  for (int r = 0; r < size; r++) {
    array_init(w, nw, blocks + (size_t)r * nb, nb, r);
    for (int k = 0; k < lanczos_iters; k++) lanczos_sweep(w, nw, (uint64_t)k);
    total += array_checksum(w, nw);
  }
  free(w);
  free(blocks);
  return total;
}

static int arg_int(int argc, char **argv, int *i, const char *name) {
  if (*i + 1 >= argc) {
    fprintf(stderr, "mpi-nemo: %s needs a value\n", name);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  int v = atoi(argv[++*i]);
  if (v < 1) {
    fprintf(stderr, "mpi-nemo: %s must be a positive number\n", name);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return v;
}

int main(int argc, char **argv) {
  int rank, size, len;
  char name[MPI_MAX_PROCESSOR_NAME] = {0};
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Get_processor_name(name, &len);
  int strain_iters = 50, block_kib = 256, lanczos_iters = 4, mem_mib = 64, verify = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--strain-iters")) strain_iters = arg_int(argc, argv, &i, argv[i]);
    else if (!strcmp(argv[i], "--block-kib")) block_kib = arg_int(argc, argv, &i, argv[i]);
    else if (!strcmp(argv[i], "--lanczos-iters")) lanczos_iters = arg_int(argc, argv, &i, argv[i]);
    else if (!strcmp(argv[i], "--mem-mib")) mem_mib = arg_int(argc, argv, &i, argv[i]);
    else if (!strcmp(argv[i], "--verify")) verify = 1;
    else {
      if (rank == 0) fprintf(stderr, "mpi-nemo: unknown argument %s\n", argv[i]);
      MPI_Finalize();
      return 2;
    }
  }
  size_t nb = (size_t)block_kib * 1024 / sizeof(uint64_t);
  size_t nw = (size_t)mem_mib * 1024 * 1024 / sizeof(uint64_t);
  int next = (rank + 1) % size, prev = (rank + size - 1) % size;
  char *names = rank == 0 ? calloc((size_t)size, MPI_MAX_PROCESSOR_NAME) : NULL;
  MPI_Gather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0,
             MPI_COMM_WORLD);

  uint64_t *u = alloc_or_die(nb * sizeof(uint64_t));
  uint64_t *left = alloc_or_die(nb * sizeof(uint64_t));
  uint64_t *right = alloc_or_die(nb * sizeof(uint64_t));
  uint64_t *fresh = alloc_or_die(nb * sizeof(uint64_t));
  block_init(u, nb, rank);
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = MPI_Wtime();
  for (int t = 0; t < strain_iters; t++) {
    /* Both directions of the ring: the left neighbour's block and the right one's. */
    MPI_Sendrecv(u, (int)nb, MPI_UINT64_T, next, 1, left, (int)nb, MPI_UINT64_T, prev, 1,
                 MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Sendrecv(u, (int)nb, MPI_UINT64_T, prev, 2, right, (int)nb, MPI_UINT64_T, next, 2,
                 MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    strain_step(fresh, u, left, right, nb, (uint64_t)t);
    uint64_t *swap = u;
    u = fresh;
    fresh = swap;
    if (rank == 0) {
      printf("nemo strain iter=%d/%d t=%.3f\n", t + 1, strain_iters, MPI_Wtime() - t0);
      fflush(stdout);
    }
  }
  free(left);
  free(right);
  free(fresh);
  double t1 = MPI_Wtime();

  uint64_t *w = alloc_or_die(nw * sizeof(uint64_t));
  array_init(w, nw, u, nb, rank);
  for (int k = 0; k < lanczos_iters; k++) {
    uint64_t local = lanczos_sweep(w, nw, (uint64_t)k), global = 0;
    MPI_Allreduce(&local, &global, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) {
      printf("nemo lanczos iter=%d/%d sum=%016llx t=%.3f\n", k + 1, lanczos_iters,
             (unsigned long long)global, MPI_Wtime() - t1);
      fflush(stdout);
    }
  }
  uint64_t mine = array_checksum(w, nw), checksum = 0;
  free(w);
  free(u);
  MPI_Reduce(&mine, &checksum, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  double t2 = MPI_Wtime();

  int ok = 1;
  if (rank == 0) {
    const char *verdict = "";
    if (verify) {
      ok = serial_checksum(size, nb, strain_iters, nw, lanczos_iters) == checksum;
      verdict = ok ? " verify=ok" : " verify=FAILED";
    }
    printf("nemo %s ranks=%d checksum=%016llx strain_s=%.3f lanczos_s=%.3f total_s=%.3f hosts=",
           ok ? "ok" : "FAILED", size, (unsigned long long)checksum, t1 - t0, t2 - t1, t2 - t0);
    for (int r = 0; r < size; r++)
      printf("%s%s", r ? "," : "", names + (size_t)r * MPI_MAX_PROCESSOR_NAME);
    printf("%s\n", verdict);
    fflush(stdout);
    free(names);
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return ok ? 0 : 1;
}
