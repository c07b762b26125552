# One image, seven binaries: ingest, processor, archiver, dashboard, simulator and the
# deadletter and alarms tools. Pick one with the container command.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ingest -p processor -p archiver -p dashboard -p simulator \
       -p deadletter -p alarms \
    && mkdir /out \
    && cp target/release/ingest target/release/processor target/release/archiver \
       target/release/dashboard target/release/simulator target/release/deadletter \
       target/release/alarms /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 pipeline
COPY --from=build /out/ /usr/local/bin/
USER pipeline
ENV LOG_FORMAT=json
CMD ["ingest", "--help"]
