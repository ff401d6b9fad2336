/* Viola MPI guest: a token ring. Each rank passes a counter to the next, LAPS times around
 * (default 1000); every rank adds one, so rank 0 expects LAPS * ranks at the end.
 *   mpiexec -n N /usr/local/bin/mpi-ring [LAPS]
 * Rank 0 prints: ring ok ranks=N laps=L time=Ts hop=Uus hosts=a,b,... (exit 0), or ring FAILED. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
  int rank, size, len, lap, token = 0;
  char name[MPI_MAX_PROCESSOR_NAME] = {0};
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Get_processor_name(name, &len);
  int laps = argc > 1 ? atoi(argv[1]) : 1000;
  if (laps < 1) laps = 1;
  int next = (rank + 1) % size, prev = (rank + size - 1) % size;
  char *names = rank == 0 ? calloc((size_t)size, MPI_MAX_PROCESSOR_NAME) : NULL;
  MPI_Gather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, names, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0,
             MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = MPI_Wtime();
  for (lap = 0; lap < laps; lap++) {
    if (rank == 0) {
      token++;
      MPI_Send(&token, 1, MPI_INT, next, 0, MPI_COMM_WORLD);
      MPI_Recv(&token, 1, MPI_INT, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else {
      MPI_Recv(&token, 1, MPI_INT, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      token++;
      MPI_Send(&token, 1, MPI_INT, next, 0, MPI_COMM_WORLD);
    }
  }
  double t = MPI_Wtime() - t0;
  int ok = 1;
  if (rank == 0) {
    ok = token == laps * size;
    printf("ring %s ranks=%d laps=%d time=%.3fs hop=%.1fus hosts=", ok ? "ok" : "FAILED", size,
           laps, t, t * 1e6 / ((double)laps * size));
    for (int r = 0; r < size; r++)
      printf("%s%s", r ? "," : "", names + (size_t)r * MPI_MAX_PROCESSOR_NAME);
    printf("\n");
    fflush(stdout);
    free(names);
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return ok ? 0 : 1;
}
