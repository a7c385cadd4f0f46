# Builds the three redtx binaries into a small runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates redis-server \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/redtx /src/target/release/redtx-coordinator /src/target/release/redtx-participant /usr/local/bin/
USER nobody
ENTRYPOINT []
CMD ["redtx", "--help"]
